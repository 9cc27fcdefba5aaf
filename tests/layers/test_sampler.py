"""Sampling: greedy, temperature, top-k/top-p/min-p, seeds, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from distserve.layers.sampler import NUCLEUS_CANDIDATES, SamplingBatch, _inverse_cdf, _top_k, _top_p, sample
from distserve.sampling_params import SamplingParams


def batch(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> SamplingBatch:
    outputs = outputs or [[] for _ in params]
    return SamplingBatch(params=params, output_token_ids=outputs, prompt_token_ids=[[] for _ in params])


def logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    x = logits()
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=1)):
        got = [r.token_id for r in sample(x, batch([p] * 4), torch.Generator().manual_seed(0))]
        assert got == x.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = logits(4)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(x[2:3], batch([seeded]), torch.Generator().manual_seed(0))[0].token_id
    others = [SamplingParams(temperature=1.0)] * 3
    mixed = sample(x[[0, 1, 2, 3]], batch(others[:2] + [seeded] + others[2:]), torch.Generator().manual_seed(99))
    assert mixed[2].token_id == alone


def test_seeded_sampling_follows_the_distribution() -> None:
    x = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    counts = [0, 0]
    for step in range(4000):
        result = sample(x, batch([SamplingParams(temperature=1.0, seed=7)], [[0] * step]), None)
        counts[result[0].token_id] += 1
    assert 0.70 < counts[1] / 4000 < 0.80


def test_top_p_keeps_the_nucleus_only() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(300):
        seen.add(sample(x, batch([SamplingParams(temperature=1.0, top_p=0.7, seed=seed)]), None)[0].token_id)
    assert seen == {0, 1}


def test_inverse_cdf_never_picks_a_token_without_probability() -> None:
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    lowest, highest = torch.zeros(2, 1), torch.full((2, 1), 1.0 - 2.0**-24)
    assert _inverse_cdf(probs, lowest).tolist() == [1, 2]
    assert _inverse_cdf(probs, highest).tolist() == [3, 2]
    assert _inverse_cdf(probs, torch.tensor([[0.1999], [0.5]])).tolist() == [1, 2]
    assert _inverse_cdf(probs, torch.tensor([[0.2001], [0.5]])).tolist() == [3, 2]


def test_unseeded_sampling_follows_the_distribution() -> None:
    p = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    x = torch.log(p).expand(2000, 5)
    results = sample(x, batch([SamplingParams(temperature=1.0)] * 2000), torch.Generator().manual_seed(3))
    freq = torch.bincount(torch.tensor([r.token_id for r in results]), minlength=5) / 2000
    assert torch.allclose(freq, p, atol=0.035)


def test_top_k_per_row_in_one_batch() -> None:
    x = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    kept = _top_k(x, [2, -1, 4]) > float("-inf")
    assert kept.tolist() == [[True, True, False, False, False], [True] * 5, [True, True, True, True, False]]


def reference_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    values, order = probs.sort(dim=-1, descending=True)
    drop = (values.cumsum(dim=-1) - values) >= top_p
    return torch.zeros_like(probs).scatter(1, order, values.masked_fill(drop, 0.0))


@pytest.mark.parametrize("spread", [6.0, 0.01])  # a peaked row (nucleus in the candidates), a flat one (sorted whole)
def test_top_p_matches_sorting_the_whole_row(spread: float) -> None:
    vocab = 4 * NUCLEUS_CANDIDATES
    probs = torch.softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)) * spread, dim=-1)
    probs[2] = torch.softmax(torch.arange(vocab, dtype=torch.float32), dim=-1)  # the nucleus is one token
    got = _top_p(probs, [0.9, 1.0, 0.5])
    assert torch.equal(got[0:1], reference_top_p(probs[0:1], 0.9))
    assert torch.equal(got[1], probs[1])
    assert torch.equal(got[2:3], reference_top_p(probs[2:3], 0.5))
    assert int((got[2] > 0).sum()) == 1
    if spread < 1:  # flat: the nucleus holds more tokens than the candidates
        assert int((got[0] > 0).sum()) > NUCLEUS_CANDIDATES


def test_min_p_drops_unlikely_tokens() -> None:
    x = torch.log(torch.tensor([[0.6, 0.3, 0.08, 0.02]]))
    seen = {sample(x, batch([SamplingParams(temperature=1.0, min_p=0.2, seed=s)]), None)[0].token_id for s in range(300)}
    assert seen == {0, 1}


def test_penalties_steer_away_from_generated_tokens() -> None:
    x = torch.tensor([[2.0, 1.9, 0.0]])
    plain = sample(x, batch([SamplingParams(temperature=0)], [[0]]), None)[0].token_id
    penalized = sample(x, batch([SamplingParams(temperature=0, presence_penalty=0.5)], [[0]]), None)[0].token_id
    freq = sample(x, batch([SamplingParams(temperature=0, frequency_penalty=0.06)], [[0, 0]]), None)[0].token_id
    rep = sample(x, batch([SamplingParams(temperature=0, repetition_penalty=1.2)], [[0]]), None)[0].token_id
    assert (plain, penalized, freq, rep) == (0, 1, 1, 1)


def test_logprobs_are_the_raw_distribution() -> None:
    x = logits(2, 30)
    results = sample(x, batch([SamplingParams(temperature=0, logprobs=3)] * 2), None)
    expected = torch.log_softmax(x, -1)
    for row, result in enumerate(results):
        assert result.rank == 1
        assert result.logprob == pytest.approx(expected[row].max().item(), abs=1e-6)
        top = expected[row].topk(3)
        assert [t for t, _ in result.top_logprobs] == top.indices.tolist()
        assert [v for _, v in result.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(logprobs=50), "logprobs"),
    ],
)
def test_bad_sampling_params_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
