"""The model's tokenizer and chat template, loaded from the model's files (for a GGUF model, from
the Hugging Face files the model store converted once). Gives token ids for text and chat messages,
the ids that end a generation, and a streaming decoder that turns tokens into text pieces without
splitting a multi-byte character. No model or network code here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer.errors import InvalidInput, ModelStoreError


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and end-of-generation ids."""

    def __init__(self, hf: Any, eos_token_ids: frozenset[int]) -> None:
        self.hf = hf
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, meta_dir: Path, config: Any = None) -> Tokenizer:
        """Load the tokenizer files of `meta_dir`; end ids come from the config and the tokenizer."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(meta_dir))
        except (OSError, ValueError) as e:
            raise ModelStoreError(f"no usable tokenizer in {meta_dir}: {e}") from e
        eos: set[int] = set()
        config_eos = getattr(config, "eos_token_id", None)
        if isinstance(config_eos, int):
            eos.add(config_eos)
        elif isinstance(config_eos, (list, tuple)):
            eos.update(int(i) for i in config_eos)
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        return cls(hf, frozenset(eos))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        """True when the model ships a chat template."""
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (with a BOS token where the model adds one)."""
        if not isinstance(text, str):
            raise InvalidInput(f"text must be a string, not {type(text).__name__}")
        return list(self.hf(text)["input_ids"])

    @property
    def takes_tools(self) -> bool:
        """True when the chat template renders tools itself (its source names `tools`)."""
        template = getattr(self.hf, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def apply_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (`tools`: OpenAI's
        function tools, for a template that takes them). A message's content is a string, or null
        beside an assistant's tool_calls."""
        if not self.has_chat_template:
            raise InvalidInput("this model has no chat template; use a plain completion instead")
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not (isinstance(content, str) or (content is None and m.get("tool_calls")))
            ):
                raise InvalidInput("each chat message must be a mapping with string 'role' and 'content'")
        from jinja2 import TemplateError

        try:
            out = self.hf.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools
            )
        except TemplateError as e:  # the template's own raise_exception, e.g. roles it does not take
            raise InvalidInput(f"the model's chat template refuses these messages: {e}") from e
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def stream(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder that yields the text each new token adds after `context` (e.g. the prompt's ids);
        special tokens add nothing, or with `skip_special_tokens` false, their names."""
        return StreamDecoder(self, context, skip_special_tokens)


class StreamDecoder:
    """Turns a growing list of token ids into text increments.

    Decoding token by token breaks multi-byte characters and word-initial spaces (SentencePiece
    drops the space of a sequence's first token), so it decodes a short window that starts with
    already-emitted context and holds back text that still ends in an incomplete character.
    """

    CONTEXT_TOKENS = 4  # prompt tokens kept as context, so a first token's leading space survives

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = [int(i) for i in context[-self.CONTEXT_TOKENS :]] if context else []
        self._prefix_start = 0  # window start: tokens before the window are done with
        self._emitted_start = len(self.ids)  # tokens from here on have text not yet emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self._prefix_start : self._emitted_start], self.skip)
        full = self.tokenizer.decode(self.ids[self._prefix_start :], self.skip)
        if full.endswith("\ufffd"):  # an incomplete character: held until a later token completes it
            return ""
        # A token that adds nothing (a skipped special token) moves the window on all the same, so
        # that a run of them does not make every later decode longer.
        self._prefix_start, self._emitted_start = self._emitted_start, len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def peek(self, token_id: int) -> str:
        """The text `token_id` would add if it came next (special tokens by name), adding nothing."""
        before = self.tokenizer.decode(self.ids[self._prefix_start :], skip_special_tokens=False).rstrip("\ufffd")
        full = self.tokenizer.decode([*self.ids[self._prefix_start :], int(token_id)], skip_special_tokens=False)
        return full[len(before) :] if full.startswith(before) else full

    def flush(self) -> str:
        """Whatever text is still held back at the end of the generation."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_start : self._emitted_start], self.skip)
        full = self.tokenizer.decode(self.ids[self._prefix_start :], self.skip)
        self._prefix_start = self._emitted_start = len(self.ids)
        return full[len(prefix) :]
