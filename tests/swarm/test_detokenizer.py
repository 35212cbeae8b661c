"""The detokenizer: text goes out at token boundaries with the tokens that made it, so the tokens
always join up to the text; stop strings are cut where they start, even across tokens; text is held
back only while its tail could still start a stop string; the prompt comes back scored for `echo`."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from peer.tokenizer import StreamDecoder
from swarm.detokenizer import Chunk, Detokenizer

EOS, HEAD, TAIL = 0, 14, 15
# Tokens 14 and 15 are the two halves of "é": alone, each decodes to the replacement character.
VOCAB = ["</s>", " 5", ",", " 6", " ", "7", "a##", "b", "#", "hello", " world", "\n", "END", "x", "\xc3", "\xa9", "<s>"]
SPECIAL = {EOS, 16}


class TableTokenizer:
    """A tokenizer whose tokens are fixed strings (0 and 16 special, 14 and 15 the bytes of "é")."""

    eos_token_ids = frozenset({EOS})

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i in SPECIAL))
        return text.replace("\xc3\xa9", "é").replace("\xc3", "\ufffd").replace("\xa9", "\ufffd")

    def stream(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, context, skip_special_tokens)  # type: ignore[arg-type]


def ids(*pieces: str) -> list[int]:
    return [VOCAB.index(p) for p in pieces]


def run(pieces: list[str], stops: tuple[str, ...] = (), max_tokens: int = 100) -> list[Chunk]:
    text = Detokenizer(TableTokenizer(), ids("hello"), stops)  # type: ignore[arg-type]
    chunks = []
    for n, token in enumerate(ids(*pieces)):
        chunk = text.add(token, -0.5, ((token, -0.5),), end_of_sequence=token == EOS)
        if chunk.finish_reason is None and n == max_tokens - 1:
            chunk = text.finish()
        chunks.append(chunk)
        if chunk.finish_reason:
            break
    return chunks


def joined(chunks: list[Chunk]) -> tuple[str, list[str]]:
    return "".join(c.text for c in chunks), [t.text for c in chunks for t in c.tokens]


def test_a_stop_string_across_tokens_is_cut_and_its_tokens_dropped() -> None:
    """The issue's example: stop " 7" after " 5, 6," arrives as " " then "7"."""
    chunks = run([" 5", ",", " 6", ",", " ", "7", "x"], stops=(" 7",))
    text, tokens = joined(chunks)
    assert text == " 5, 6,"
    assert tokens == [" 5", ",", " 6", ","]  # no " " nor "7": the tokens join up to the text
    assert chunks[-1].finish_reason == "stop"


def test_a_token_the_stop_string_starts_inside_is_clipped() -> None:
    text, tokens = joined(run(["b", "a##", "b"], stops=("##",)))
    assert (text, tokens) == ("ba", ["b", "a"])


def test_text_is_held_only_while_it_could_start_a_stop_string() -> None:
    chunks = run(["hello", " world", "#", "b", "#", "#", "b"], stops=("###",))
    # "hello" and " world" go out at once: no stop string starts with their tails.
    assert [c.text for c in chunks[:2]] == ["hello", " world"]
    assert chunks[2].text == ""  # "#" could start "###"
    assert chunks[3].text == "#b"  # "#b" cannot: the held "#" goes out with it
    assert [c.text for c in chunks[4:6]] == ["", ""]  # "#", "##": still possible
    assert chunks[6].text == "##b" and chunks[6].finish_reason is None
    text, tokens = joined(chunks)
    assert "".join(tokens) == text == "hello world#b##b"


def test_without_stop_strings_every_token_goes_out_at_once() -> None:
    chunks = run(["#", "#", "x"])
    assert [c.text for c in chunks] == ["#", "#", "x"]


def test_end_of_sequence_ends_with_its_token_named_outside_the_text() -> None:
    chunks = run(["x", "#", "</s>"], stops=("##",))
    text, tokens = joined(chunks)
    assert text == "x#"  # the held "#" is released: no stop string came
    assert tokens == ["x", "#", "</s>"]
    assert chunks[-1].finish_reason == "stop"


def test_max_tokens_ends_with_length_and_every_held_character() -> None:
    chunks = run(["x", "#"], stops=("##",), max_tokens=2)
    assert joined(chunks) == ("x#", ["x", "#"])
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("pieces", "stops", "text"),
    [
        (["hello", " world"], ("world",), "hello "),
        (["hello", " world"], ("world", "lo"), "hel"),
        (["hello", " world"], ("o", "hello"), ""),
        (["x", "\n", "\n", "END"], ("\n\n", "END"), "x"),
        (["x", "\n", "END", "\n"], ("\n\n", "END"), "x\n"),
    ],
)
def test_the_earliest_stop_string_wins(pieces: list[str], stops: tuple[str, ...], text: str) -> None:
    chunks = run(pieces, stops)
    assert joined(chunks)[0] == text
    assert chunks[-1].finish_reason == "stop"


def test_alternatives_are_named_by_the_text_they_would_add() -> None:
    text = Detokenizer(TableTokenizer(), ids("hello"))  # type: ignore[arg-type]
    chunk = text.add(ids(" world")[0], -0.1, ((ids(" world")[0], -0.1), (EOS, -3.0)))
    assert [(a.text, a.logprob) for a in chunk.tokens[0].top] == [(" world", -0.1), ("</s>", -3.0)]


def test_the_prompt_comes_back_scored_from_its_second_token() -> None:
    prompt = ids("hello", " world", "\n")
    text = Detokenizer(TableTokenizer(), prompt)  # type: ignore[arg-type]
    chunk = text.prompt([(-1.5, ((1, -0.2),)), (-2.5, ())])
    assert chunk.text == "hello world\n"
    assert [t.text for t in chunk.tokens] == ["hello", " world", "\n"]
    assert [t.logprob for t in chunk.tokens] == [None, -1.5, -2.5]
    assert chunk.tokens[0].top == () and chunk.tokens[1].top[0].text == " 5"


def test_a_character_split_over_tokens_goes_out_with_them_and_joins_at_the_end() -> None:
    chunks = run(["x", "\xc3", "\xa9", "x"])
    assert joined(chunks) == ("xéx", ["x", "", "é", "x"])
    cut = run(["x", "\xc3"], max_tokens=2)  # ends mid-character: the flush belongs to the last token
    text, tokens = joined(cut)
    assert text == "x\ufffd" and "".join(tokens) == text


def test_special_tokens_inside_a_reply_add_no_text_and_do_not_rename_the_alternatives() -> None:
    text = Detokenizer(TableTokenizer(), ids("hello"))  # type: ignore[arg-type]
    text.add(16, -1.0)  # a special token: no text
    chunk = text.add(ids("x")[0], -0.5, ((ids("x")[0], -0.5), (ids("b")[0], -2.0)))
    assert chunk.text == "x" and [a.text for a in chunk.tokens[-1].top] == ["x", "b"]


def test_an_echoed_prompt_keeps_its_special_tokens() -> None:
    prompt = [16, *ids("hello", "\n")]
    chunk = Detokenizer(TableTokenizer(), prompt).prompt([(-1.0, ()), (-2.0, ())])  # type: ignore[arg-type]
    assert chunk.text == "<s>hello\n" and [t.text for t in chunk.tokens] == ["<s>", "hello", "\n"]
