"""From logits to next tokens: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Sampling inverts the cumulative distribution: one uniform draw U per row, and the token is
the first whose running sum of probabilities exceeds U x the row's total. That costs a
prefix sum and a binary search a row, where one random draw per vocabulary entry (the
Gumbel-max trick) costs ~20 ns each on a CPU: ~1 ms a row for a 49k vocabulary. A request
with a seed draws U from a generator seeded by (seed, index of the token it samples), so its
samples are the same alone or in any batch, and whichever instance (prefill or decode)
samples the token.
Logprobs are those of the model's raw distribution, before any processing (as vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distserve.kernels import native_ops
from distserve.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


@dataclass
class SamplingBatch:
    """What the sampler needs of each row of the logits."""

    params: list[SamplingParams]
    output_token_ids: list[list[int]]  # for penalties, and the index of the token to sample
    prompt_token_ids: list[list[int]]  # for the repetition penalty

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def tokens_only(self) -> bool:
        """Every row greedy, without penalties or logprobs: its argmax token is all it needs."""
        return all(p.greedy and not p.has_penalties and p.logprobs is None for p in self.params)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def step_seed(seed: int, index: int) -> int:
    """Seed of the generator that samples output token `index` of a request seeded `seed`."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) & _MASK64


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), by the native kernel where it applies (torch's argmax over a
    vocabulary-long row runs scalar: ~125 us a row here against ~10 us)."""
    ops = native_ops(logits)
    if ops is not None and logits.dim() == 2 and logits.stride(1) == 1:
        return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> list[SampleResult]:
    """logits: [B, vocab] -> one SampleResult per row."""
    logits = logits.float()
    want_logprobs = any(p.logprobs is not None for p in batch.params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if batch.all_greedy and not any(p.has_penalties for p in batch.params):
        tokens = greedy(logits)
    else:
        tokens = _sample(logits, batch, generator)
    token_list = tokens.tolist()
    results = [SampleResult(t) for t in token_list]
    if raw_logprobs is not None:
        _fill_logprobs(raw_logprobs, tokens, batch, results)
    return results


def _sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    params = batch.params
    device = logits.device
    if any(p.has_penalties for p in params):
        logits = _apply_penalties(logits, batch)
    greedy_tokens = greedy(logits)
    if all(p.greedy for p in params):
        return greedy_tokens
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    logits = logits / temperature.unsqueeze(1)
    if any(p.top_k > 0 for p in params):
        logits = _top_k(logits, [p.top_k for p in params])
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        probs = _top_p(probs, [p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
    sampled = _inverse_cdf(probs, _uniforms(batch, generator, device))
    is_greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(is_greedy, greedy_tokens, sampled)


def _top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0: all of them); ties at the k-th value are kept."""
    vocab = logits.shape[1]
    widest = min(vocab, max(top_k))
    k = torch.tensor([min(k, vocab) if k > 0 else widest for k in top_k], device=logits.device)
    kth = logits.topk(widest, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    limited = torch.tensor([k > 0 for k in top_k], device=logits.device).unsqueeze(1)
    return logits.masked_fill(limited & (logits < kth), float("-inf"))


# the nucleus is looked for among a row's most likely tokens first (a partial sort), and by
# sorting the whole row only when they do not reach top_p
NUCLEUS_CANDIDATES = 256


def _top_p(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Drop a token when the mass of the more likely tokens before it already reaches top_p."""
    probs = probs.clone()
    rows = torch.tensor([i for i, p in enumerate(top_p) if p < 1.0], device=probs.device)
    threshold = torch.tensor(top_p, device=probs.device).unsqueeze(1)[rows]
    values, order = probs[rows].topk(min(NUCLEUS_CANDIDATES, probs.shape[1]), dim=-1)
    inside = (values.sum(dim=-1, keepdim=True) >= threshold).squeeze(1)
    wide = rows[~inside]
    if len(wide):  # the nucleus is wider than the candidates: sort these rows whole
        v, o = probs[wide].sort(dim=-1, descending=True)
        probs[wide] = _keep_nucleus(v, o, threshold[~inside])
    narrow = rows[inside]
    if len(narrow):
        probs[narrow] = _keep_nucleus(values[inside], order[inside], threshold[inside], probs.shape[1])
    return probs


def _keep_nucleus(values: torch.Tensor, order: torch.Tensor, threshold: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Rows of probabilities from their largest `values` (at vocabulary ids `order`, in
    descending order), without the tokens past the nucleus."""
    drop = (values.cumsum(dim=-1) - values) >= threshold
    out = torch.zeros(len(values), vocab or values.shape[1], device=values.device)
    return out.scatter_(1, order, values.masked_fill(drop, 0.0))


def _uniforms(batch: SamplingBatch, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One U ~ Uniform[0, 1) per row: from the engine's generator, or the request's own."""
    u = torch.empty(len(batch.params), 1, device=device)
    unseeded = [i for i, p in enumerate(batch.params) if p.seed is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, device=device, generator=generator)
    for i, p in enumerate(batch.params):
        if p.seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(step_seed(p.seed, len(batch.output_token_ids[i])))
            u[i] = torch.rand(1, device=device, generator=g)
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose cumulative probability first exceeds u x the row's total.

    Tokens of zero probability are never chosen: the sum does not rise at them, and a draw
    that rounds up to the total takes the last token that has any probability."""
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:].contiguous()
    chosen = torch.searchsorted(cumulative, u * total, right=True)
    last = torch.searchsorted(cumulative, total, right=False)
    tokens = torch.minimum(chosen, last).squeeze(1)
    if bool((tokens >= probs.shape[-1]).any()):  # a NaN distribution finds no token
        raise ValueError("a sampling distribution has no valid token (NaN probabilities).")
    return tokens


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; repetition over prompt + output."""
    batch_size, vocab = logits.shape
    device = logits.device
    longest = max((len(ids) for ids in batch.output_token_ids), default=0)
    counts = torch.zeros(batch_size, vocab + 1, device=device)
    if longest:
        padded = torch.full((batch_size, longest), vocab, dtype=torch.long)
        for i, ids in enumerate(batch.output_token_ids):
            padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        counts.scatter_add_(1, padded.to(device), torch.ones(batch_size, longest, device=device))
    counts = counts[:, :vocab]
    presence = torch.tensor([p.presence_penalty for p in batch.params], device=device).unsqueeze(1)
    frequency = torch.tensor([p.frequency_penalty for p in batch.params], device=device).unsqueeze(1)
    logits = logits - frequency * counts - presence * (counts > 0).float()
    repetition = torch.tensor([p.repetition_penalty for p in batch.params], device=device).unsqueeze(1)
    if (repetition != 1.0).any():
        seen = counts > 0
        for i, ids in enumerate(batch.prompt_token_ids):
            if batch.params[i].repetition_penalty != 1.0 and ids:
                seen[i, torch.tensor(ids, device=device)] = True
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    return logits


def _fill_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch, results: list[SampleResult]
) -> None:
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_n = max(p.logprobs or 0 for p in batch.params)
    top = logprobs.topk(top_n, dim=-1) if top_n else None
    chosen_list, rank_list = chosen.tolist(), ranks.tolist()
    for i, p in enumerate(batch.params):
        if p.logprobs is None:
            continue
        results[i].logprob = chosen_list[i]
        results[i].rank = rank_list[i]
        if top is not None and p.logprobs:
            ids = top.indices[i, : p.logprobs].tolist()
            values = top.values[i, : p.logprobs].tolist()
            results[i].top_logprobs = list(zip(ids, values))
        else:
            results[i].top_logprobs = []
