"""PNG plots of a benchmark report: attainment vs rate, attainment vs SLO scale, latency
breakdown, and the CDF of KV transfer time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_LABELS = {
    "prefill_queueing": "prefill queueing",
    "prefill_execution": "prefill execution",
    "transfer_queueing": "waiting for decode",
    "transfer": "KV transfer",
    "decode_queueing": "decode queueing",
    "decode_execution": "decode execution",
}


def _attainment_at_scale(requests: list[dict], ttft: float, tpot: float, scale: float) -> float:
    ok = [
        r["ttft"] is not None and r["ttft"] <= ttft * scale and r["tpot"] <= tpot * scale
        for r in requests
    ]
    return sum(ok) / len(ok) if ok else 0.0


def plot_report(data: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = data["settings"]
    target = s["target"]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sys_ in data["systems"].items():
        runs = sorted(sys_["runs"], key=lambda r: r["rate"])
        ax.plot([r["rate"] / sys_["devices"] for r in runs], [100 * r["attainment"] for r in runs], marker="o", label=name)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"TTFT {s['ttft_slo'] * 1e3:.0f} ms, TPOT {s['tpot_slo'] * 1e3:.0f} ms")
    ax.set_ylim(-5, 105)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "attainment_vs_rate.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    scales = [0.25 * i for i in range(1, 17)]
    for name, sys_ in data["systems"].items():
        rate = sys_["slo_scale"]["rate"]
        run = next(r for r in sys_["runs"] if r["rate"] == rate)
        ax.plot(scales, [100 * _attainment_at_scale(run["requests"], s["ttft_slo"], s["tpot_slo"], k) for k in scales],
                marker=".", label=f"{name} @ {rate:g} req/s")
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("SLO scale (multiple of both SLOs)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-5, 105)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "attainment_vs_slo_scale.png"))

    with_breakdown = {n: v["breakdown"] for n, v in data["systems"].items() if v["breakdown"]["seconds"]}
    if with_breakdown:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(with_breakdown)
        bottoms = [0.0] * len(names)
        for stage, label in STAGE_LABELS.items():
            values = [1e3 * with_breakdown[n]["seconds"].get(stage, 0.0) for n in names]
            ax.bar(names, values, bottom=bottoms, label=label)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        ax.set_ylabel("mean latency (ms)")
        ax.set_title("latency breakdown (" + ", ".join(f"{n} @ {with_breakdown[n]['rate']:g}" for n in names) + " req/s)", fontsize=8)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "latency_breakdown.png"))

    transfers = {
        n: sorted(t for run in v["runs"] for t in (r["transfer_seconds"] for r in run["requests"]) if t)
        for n, v in data["systems"].items()
    }
    transfers = {n: t for n, t in transfers.items() if t}
    if transfers:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, times in transfers.items():
            ax.plot([1e3 * t for t in times], [(i + 1) / len(times) for i in range(len(times))], label=name)
        longest = max(max(t) for t in transfers.values())
        shortest = max(min(min(t) for t in transfers.values()), 1e-9)
        ax.set_xscale("log" if longest / shortest > 50 else "linear")
        ax.set_xlabel("KV transfer time per request (ms)")
        ax.set_ylabel("CDF")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "kv_transfer_cdf.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

