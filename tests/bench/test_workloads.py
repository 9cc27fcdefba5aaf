"""Workload loaders on small fixture files, and arrival processes."""

from __future__ import annotations

import gzip
import json
import statistics

import pytest

from distserve.bench.arrivals import arrival_times
from distserve.bench.workloads import WorkloadSpec, complete_json_records, load_workload
from tests.tiny_models import trained_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()


def conversation(i: int) -> dict:
    return {"id": str(i), "conversations": [{"from": "human", "value": f"the café {i} " * (3 + i)},
                                            {"from": "gpt", "value": "and the " * (4 + i)}]}


def test_sharegpt_reads_the_complete_records_of_a_cut_file(tmp_path, tokenizer) -> None:
    text = json.dumps([conversation(i) for i in range(4)], indent=2)
    cut = text[: text.rindex("and the")]  # cut inside the last record, like the packaged copy
    assert len(list(complete_json_records(cut))) == 3
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    requests = load_workload(WorkloadSpec.parse(f"sharegpt:{path}", num_requests=10), tokenizer)
    assert len(requests) == 3
    for r in requests:
        assert r.prompt_len == len(r.prompt_token_ids) >= 4 and r.output_len >= 4


def test_sharegpt_multiturn_prompts_are_the_turns_before_a_reply(tmp_path, tokenizer) -> None:
    turns = ["one two three four", "five six seven eight nine", "ten eleven twelve", "the the the the the the"]
    records = [{"conversations": [{"from": "human" if j % 2 == 0 else "gpt", "value": t} for j, t in enumerate(turns)]},
               conversation(0)]  # two turns: too short for the multi-turn workload
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records * 20))
    requests = load_workload(WorkloadSpec.parse(f"sharegpt-multiturn:{path}", num_requests=100), tokenizer)
    assert len(requests) == 20  # only the four-turn conversations
    ids = [tokenizer("\n".join(turns[:k]), add_special_tokens=False)["input_ids"] for k in (1, 2, 3)]
    outputs = [len(tokenizer(turns[k], add_special_tokens=False)["input_ids"]) for k in (1, 2, 3)]
    seen = set()
    for r in requests:
        k = ids.index(r.prompt_token_ids)  # the first k turns, joined by newlines
        assert r.output_len == outputs[k]  # the reply is turn k + 1
        seen.add(k)
    assert seen == {0, 1, 2}  # k is drawn, not fixed


def test_filters_drop_pairs_longer_than_the_context(tmp_path, tokenizer) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([conversation(i) for i in range(6)]))
    full = load_workload(WorkloadSpec.parse(f"sharegpt:{path}"), tokenizer)
    short = load_workload(WorkloadSpec.parse(f"sharegpt:{path}", max_model_len=40), tokenizer)
    assert len(short) < len(full) and all(r.prompt_len + r.output_len <= 40 for r in short)


def test_humaneval_from_a_jsonl_gz(tmp_path, tokenizer) -> None:
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(5):
            f.write(json.dumps({"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n    \"\"\"the café\"\"\"\n"}) + "\n")
    requests = load_workload(WorkloadSpec.parse(f"humaneval:{path}", output_len=32), tokenizer)
    assert len(requests) == 5 and all(r.output_len == 32 for r in requests)
    with pytest.raises(ValueError, match="output length"):
        load_workload(WorkloadSpec.parse(f"humaneval:{path}"), tokenizer)


def test_longbench_jsonl(tmp_path, tokenizer) -> None:
    path = tmp_path / "lb.jsonl"
    path.write_text("\n".join(json.dumps({"context": "the café " * 50, "input": "summarize",
        "answers": ["the end of it"]}) for _ in range(3)))
    requests = load_workload(WorkloadSpec.parse(f"longbench:{path}"), tokenizer)
    assert len(requests) == 3 and all(r.prompt_len > 50 and r.output_len == len(tokenizer("the end of it")["input_ids"]) for r in requests)


def test_trace_csv_gives_exact_lengths_and_times(tmp_path, tokenizer) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.5,5000,3\n")
    requests = load_workload(WorkloadSpec.parse(f"trace:{path}"), tokenizer)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(374, 44), (396, 109)]  # the 5000-token one is filtered
    assert requests[0].arrival_time == 0.0 and requests[1].arrival_time == pytest.approx(4.314579, abs=1e-5)


def test_synthetic_lengths(tokenizer) -> None:
    fixed = load_workload(WorkloadSpec.parse("synthetic:fixed:33:7", num_requests=4), tokenizer)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(33, 7)] * 4
    uniform = load_workload(WorkloadSpec.parse("synthetic:uniform:10:20:5:6", num_requests=50), tokenizer)
    assert all(10 <= r.prompt_len <= 20 and 5 <= r.output_len <= 6 for r in uniform)
    with pytest.raises(ValueError, match="synthetic lengths"):
        load_workload(WorkloadSpec.parse("synthetic:zipf:3"), tokenizer)


def test_poisson_and_gamma_arrivals_have_the_rate_and_spread() -> None:
    for process, cv in (("poisson", 1.0), ("gamma", 2.0), ("gamma", 0.5)):
        times = arrival_times(20000, rate=4.0, process=process, cv=cv, seed=1)
        gaps = [b - a for a, b in zip(times, times[1:])]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(0.25, rel=0.05)
        assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.08)


def test_trace_arrivals_keep_the_shape_at_the_new_rate() -> None:
    times = arrival_times(3, rate=1.0, process="trace", trace=[10.0, 11.0, 14.0])
    assert times == pytest.approx([0.0, 0.5, 2.0])
