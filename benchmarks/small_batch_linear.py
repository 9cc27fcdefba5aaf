"""Decode-sized matmuls three ways, by rows, with cold weights as a decode step sees them (each
of 16 layers' weights read once in turn, 16 x the weight bytes far past the caches):
- panel: distserve's kernel over the weight in column panels (kernels/panel_linear.cpp);
- stream: the streaming kernel over the plain weight (where AVX-512 is missing);
- oneDNN's packed linear (what torch runs on CPU, and vLLM).
This sets `PANEL_ROWS` and `SMALL_BATCH`: the rows up to which a decode step takes the panel
(or streaming) kernel rather than oneDNN.

    python -m benchmarks.small_batch_linear

Prints a table (ms a matmul, and oneDNN's time over each) and writes
benchmarks/results/small_batch_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import report
from distserve.kernels import cpu_ops

RESULTS = Path("benchmarks/results")
LAYERS = 16
SHAPES = [(768, 1280), (768, 4096), (2048, 768), (576, 3072), (1536, 576), (1024, 4096)]  # (in, out)
ROWS = (1, 2, 3, 4, 8, 16, 32, 48, 64, 96, 128)
# LM heads (a vocabulary wide: SmolLM2's, OPT's, LLaMA-2's): each far past the caches alone
HEADS = [(576, 49152), (1024, 50272), (768, 32000)]
HEAD_ROWS = (1, 8, 32, 64, 128, 256)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    ops = cpu_ops()
    rows = []
    for (k, n), layers, row_counts in [(s, LAYERS, ROWS) for s in SHAPES] + [(h, 2, HEAD_ROWS) for h in HEADS]:
        weights = [torch.randn(n, k) for _ in range(layers)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
        panels = [ops.pack_panels(w) for w in weights]
        for m in row_counts:
            x = torch.randn(m, k)
            paths = {"panel": lambda i, x=x, p=panels, n=n: ops.panel_linear(x, p[i], n, None),
                     "stream": lambda i, x=x, w=weights: ops.linear_small_batch(x, w[i], None),
                     "onednn": lambda i, x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p[i], None, "none", [], "")}
            if m > 8:
                del paths["stream"]
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(7):
                for name, run in paths.items():
                    start = time.perf_counter()
                    for i in range(layers):
                        run(i)
                    times[name].append((time.perf_counter() - start) / layers)
            ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
            stream = ms.get("stream", float("nan"))
            rows.append({"shape": f"{k}->{n}", "rows": m, "panel_ms": ms["panel"], "stream_ms": stream,
                         "onednn_ms": ms["onednn"], "onednn_over_panel": ms["onednn"] / ms["panel"],
                         "onednn_over_stream": ms["onednn"] / stream})
    report(rows, [("shape", "shape", "s"), ("rows", "rows", "d"), ("panel ms", "panel_ms", ".3f"),
                  ("stream ms", "stream_ms", ".3f"), ("oneDNN ms", "onednn_ms", ".3f"),
                  ("oneDNN / panel", "onednn_over_panel", ".2f"), ("oneDNN / stream", "onednn_over_stream", ".2f")],
           RESULTS / "small_batch_linear.json", layers=LAYERS, threads=2)


if __name__ == "__main__":
    main()
