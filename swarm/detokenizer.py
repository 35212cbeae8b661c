"""A generation's text as its tokens come home: each token's piece of the text (decoded in context,
so multi-byte characters and leading spaces survive), stop strings found and cut, and the text held
back only while its tail could still be the start of a stop string. The text goes out at token
boundaries, with the tokens that made it, so the log-probabilities a client gets join up to exactly
the text it gets, stop strings trimmed (vLLM's detokenizer does the same work; this one is ours
because it also aligns the tokens). It knows tokens, text and log-probabilities; where they came from
and how they are sent is the entry's and the API's business."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peer.sampling import TopLogprobs
from peer.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 1000  # per stop string: the tail checked after each token is at most this long


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a position."""

    token: int
    text: str  # what it would have added to the text there
    logprob: float


@dataclass(frozen=True)
class OutToken:
    """A token as the client sees it."""

    token: int
    text: str  # its piece of the returned text (an end-of-sequence token: its own name, outside the text)
    logprob: float | None  # None for the prompt's first token (nothing before it to score it)
    top: tuple[Alternative, ...] = ()  # the most likely tokens at its position, best first
    ends: bool = False  # the end-of-sequence token that ended the generation


@dataclass(frozen=True)
class Chunk:
    """Text ready to go to the client, and the tokens it is made of."""

    text: str
    tokens: tuple[OutToken, ...] = ()
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


class Detokenizer:
    """Turns one generation's tokens into chunks of text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self._decoder = tokenizer.stream(prompt_ids)
        self._prompt_ids = list(prompt_ids)
        self.text = ""  # all the generated text so far (stop strings not yet cut)
        self.emitted = 0  # characters of `text` sent out
        self._pending: list[tuple[int, OutToken]] = []  # tokens not sent out yet, with where their text starts
        self._searched = 0  # stop strings are looked for from here on (less the longest one)

    def prompt(self, scored: Sequence[tuple[float, TopLogprobs]]) -> Chunk:
        """The prompt as text and tokens (OpenAI's `echo`), `scored`: each prompt token's log-probability
        after the first, with the most likely tokens there, as the last stage computed them."""
        decoder = self.tokenizer.stream(skip_special_tokens=False)  # the prompt as it was sent, special tokens too
        tokens = []
        for i, token in enumerate(self._prompt_ids):
            logprob, top = scored[i - 1] if 0 < i <= len(scored) else (None, ())
            alternatives = tuple(Alternative(t, decoder.peek(t), lp) for t, lp in top)
            tokens.append(OutToken(token, decoder.push(token), logprob, alternatives))
        rest = decoder.flush()
        if rest and tokens:
            last = tokens[-1]
            tokens[-1] = OutToken(last.token, last.text + rest, last.logprob, last.top)
        return Chunk("".join(t.text for t in tokens), tuple(tokens))

    def add(self, token: int, logprob: float, top: TopLogprobs = (), *, end_of_sequence: bool = False) -> Chunk:
        """One generated token: the chunk that can go out now; finish_reason "stop" when it ends the
        sequence or completes a stop string (the text is cut where the stop string starts)."""
        alternatives = tuple(Alternative(t, self._decoder.peek(t), lp) for t, lp in top)
        if end_of_sequence:
            name = self.tokenizer.decode([token], skip_special_tokens=False)
            self._append(self._decoder.flush())
            chunk = self._release(len(self.text))
            return Chunk(chunk.text, (*chunk.tokens, OutToken(token, name, logprob, alternatives, ends=True)), "stop")
        start = len(self.text)
        piece = self._decoder.push(token)
        self.text += piece
        self._pending.append((start, OutToken(token, piece, logprob, alternatives)))
        cut = self._first_stop()
        if cut is not None:
            return self._finished(cut, "stop")
        return self._release(len(self.text) - self._held())

    def finish(self) -> Chunk:
        """The generation reached max_tokens: everything left, with finish_reason "length"."""
        self._append(self._decoder.flush())
        return self._finished(len(self.text), "length")

    def _append(self, rest: str) -> None:
        """Add text the decoder held back to the text, and to the last pending token's piece."""
        self.text += rest
        if rest and self._pending:
            start, last = self._pending[-1]
            self._pending[-1] = (start, OutToken(last.token, last.text + rest, last.logprob, last.top))

    def _finished(self, end: int, reason: str) -> Chunk:
        chunk = self._release(end, clip=True)
        return Chunk(chunk.text, chunk.tokens, reason)

    def _release(self, end: int, clip: bool = False) -> Chunk:
        """The pending tokens whose text ends by `end`, and their text; with `clip`, also the one that
        `end` falls inside, its piece cut there (a stop string starting within it), and no later ones."""
        out = []
        at = self.emitted
        while self._pending:
            start, token = self._pending[0]
            stop = start + len(token.text)
            if not clip and not token.text and len(self._pending) == 1:
                break  # it may hold part of a character: text the decoder's flush gives it at the end
            if stop <= end:
                out.append(token)
                at = stop
            elif clip and start < end:
                out.append(OutToken(token.token, token.text[: end - start], token.logprob, token.top))
                at = end
            else:
                break
            self._pending.pop(0)
        if clip:
            self._pending.clear()
            at = max(end, self.emitted)
        text = self.text[self.emitted : at]
        self.emitted = at
        return Chunk(text, tuple(out))

    def _first_stop(self) -> int | None:
        """Where the earliest stop string starts in the text, if one has appeared."""
        if not self.stops:
            return None
        begin = max(0, self._searched - max(len(s) for s in self.stops) + 1)
        self._searched = len(self.text)
        found = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """How many characters at the end of the text could be the start of a stop string."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
