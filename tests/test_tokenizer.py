"""Incremental detokenization equals a full decode (byte-level BPE and SentencePiece), never
emits broken UTF-8, and handles stop strings."""

from __future__ import annotations

import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from distserve.sampling_params import SamplingParams
from distserve.tokenizer import IncrementalDetokenizer
from tests.tiny_models import corpus, trained_tokenizer

TEXT = " the café   naïve 東京 and 😀🚀 über\n\n“quoted” données — señor.  end"


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus(), vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", eos_token="</s>")


def stream(tokenizer, prompt: list[int], ids: list[int], params: SamplingParams) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    pieces = []
    for token in ids:
        stop = detok.add(token)
        pieces.append(detok.delta(stop is not None))
        if stop is not None:
            return "".join(pieces), pieces
    pieces.append(detok.delta(True))
    return "".join(pieces), pieces


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_stream_equals_full_decode(kind: str, sentencepiece_tokenizer) -> None:
    tokenizer = trained_tokenizer() if kind == "bpe" else sentencepiece_tokenizer
    prompt = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    full = decode(prompt + ids)[len(decode(prompt)):]
    text, pieces = stream(tokenizer, prompt, ids, SamplingParams())
    assert text == full
    assert all("\ufffd" not in p for p in pieces)  # no half characters in any piece


def test_stop_string_is_trimmed_and_held_back() -> None:
    tokenizer = trained_tokenizer()
    ids = tokenizer(" the café and the end", add_special_tokens=False)["input_ids"]
    text, pieces = stream(tokenizer, [], ids, SamplingParams(stop=["and th"]))
    assert text == " the café "
    assert not any("and" in p for p in pieces)


def test_stop_string_kept_when_asked() -> None:
    tokenizer = trained_tokenizer()
    ids = tokenizer(" the café and the end", add_special_tokens=False)["input_ids"]
    text, _ = stream(tokenizer, [], ids, SamplingParams(stop=["café"], include_stop_str_in_output=True))
    assert text == " the café"
