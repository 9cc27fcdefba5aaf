"""Tokenizers (through transformers) and incremental detokenization with stop strings.

`IncrementalDetokenizer` turns generated ids into text as they arrive with tokenizers'
`DecodeStream`, seeded with the prompt so that byte-level BPE and SentencePiece both get
their spaces right and a multi-byte character split over tokens is only emitted whole. It
also finds stop strings, trims them, and holds back text that could still become one.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distserve.config import ModelConfig
from distserve.sampling_params import SamplingParams

# Context the decode stream is seeded with: enough for the decoder to see word boundaries.
_PREFIX_TOKENS = 8


def load_tokenizer(model: ModelConfig, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer: a named one, the folder's, or the GGUF's (converted once)."""
    if tokenizer is None and model.gguf_file is not None:
        from distserve.weights.gguf import gguf_tokenizer_dir

        tokenizer = gguf_tokenizer_dir(f"{model.path}/{model.gguf_file}")
    source = tokenizer or model.path
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {source}: {exc}. Pass tokenizer=PATH.") from None
    if not tok.is_fast:
        raise ValueError(f"the tokenizer of {source} has no fast (tokenizers) version, which distserve needs.")
    return tok


def eos_token_ids(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: the config's, the generation config's, the tokenizer's."""
    ids: set[int] = set()
    candidates: list[object] = [getattr(model.hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        from transformers import GenerationConfig

        candidates.append(GenerationConfig.from_pretrained(model.path).eos_token_id)
    except (OSError, ValueError):
        pass
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(i for i in ids if 0 <= i < model.vocab_size)


class IncrementalDetokenizer:
    """Text of a request's generated tokens, built one token at a time."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer.backend_tokenizer  # the tokenizers.Tokenizer behind it
        prefix = list(prompt_token_ids[-_PREFIX_TOKENS:])
        self._stream = DecodeStream(ids=prefix, skip_special_tokens=params.skip_special_tokens)
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any."""
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - self._hold - 1)
        self.text += piece
        for stop in self._stops:
            at = self.text.find(stop, start)
            if at != -1:
                self.text = self.text[: at + len(stop)] if self._include_stop else self.text[:at]
                return stop
        return None

    def delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, the tail that could start a stop string
        is held back."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self._hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
