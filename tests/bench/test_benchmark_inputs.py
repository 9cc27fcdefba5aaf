"""The benchmarks' own inputs: a workload family given on the command line, and a production
trace turned into the arrivals and lengths vLLM's client replays."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.offline_throughput import Family, parse_family
from benchmarks.online_serving import TRACE_CONTEXT, trace_file


def test_family_from_the_command_line() -> None:
    name, family = parse_family("tiny=256:8-64:16-32")
    assert name == "tiny" and family == Family(256, (8, 64), (16, 32))
    prompts, outputs = family.draw(vocab=1000, seed=0)
    assert len(prompts) == len(outputs) == 256
    assert all(8 <= len(p) <= 64 for p in prompts) and all(16 <= n <= 32 for n in outputs)
    for bad in ("tiny", "tiny=256:8-64", "tiny=0:8-64:8-64", "tiny=4:64-8:8-64", "tiny=4:0-8:8-64"):
        with pytest.raises(argparse.ArgumentTypeError, match="--family"):
            parse_family(bad)


def test_trace_replayed_at_a_rate(tmp_path) -> None:  # noqa: ANN001 - pytest's tmp_path
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.6805900,20,3\n"
                     "2023-11-16 18:15:52.6805900,9000,100\n"
                     "2023-11-16 18:15:58.6805900,40,1\n"
                     "2023-11-16 18:16:30.0000000,50,5\n")  # past --requests: not replayed
    rows = [json.loads(line) for line in trace_file(trace, 4, 0.5, 0.5, tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    # the trace's gaps (4, 2, 6 s), stretched so that 4 requests arrive at a mean 0.5 req/s
    assert [r["timestamp"] for r in rows] == pytest.approx([0.0, 2.0, 3.0, 6.0])
    assert [r["output_length"] for r in rows] == [22, 2, 50, 1]  # halved, at least one token
    assert [r["input_length"] for r in rows] == [187, 10, TRACE_CONTEXT - 50 - 16, 20]  # the long one cut to fit
    hashes = [h for r in rows for h in r["hash_ids"]]
    assert len(hashes) == len(set(hashes))  # no two prompts share a chunk
    assert [len(r["hash_ids"]) for r in rows] == [-(-r["input_length"] // 16) for r in rows]
    with pytest.raises(ValueError, match="at least 2 requests"):
        trace_file(trace, 1, 0.5, 1.0, tmp_path / "one.jsonl")
