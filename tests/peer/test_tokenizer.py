"""The streaming decoder: text increments that concatenate to the full decode, with the leading
space of the first generated word kept (SentencePiece decoders strip a sequence's first space)."""

from __future__ import annotations

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peer.tokenizer import Tokenizer

WORDS = ["▁The", "▁future", "▁of", "▁AI", "▁is", "▁to", "▁help", "[UNK]"]


def sentencepiece_like() -> Tokenizer:
    """A word-level tokenizer with SentencePiece's metaspace rules, as TinyLlama and Llama 2 have."""
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]"), frozenset())


def test_first_generated_word_keeps_its_space() -> None:
    tok = sentencepiece_like()
    prompt = tok.encode("The future of AI is")
    assert tok.decode(prompt) == "The future of AI is"
    assert tok.decode([WORDS.index("▁to")]) == "to"  # decoded alone, the space is gone
    stream = tok.stream(prompt)
    pieces = [stream.push(WORDS.index(w)) for w in ("▁to", "▁help")]
    assert pieces == [" to", " help"]
    assert stream.flush() == ""
    # Without context the first word is glued to the prompt, which is why generate passes the prompt.
    assert tok.stream().push(WORDS.index("▁to")) == "to"
