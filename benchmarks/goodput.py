"""Goodput within SLOs on this machine: distserve disaggregated (1 prefill + 1 decode instance,
one core each), colocated (both cores), chunked prefill (both cores) and vLLM's CPU build (both
cores), on a chatbot workload (ShareGPT lengths) and a summarization one (long prompts, short
outputs). Then the planner's simulator, with latency models fitted to this engine
(`distserve profile`), predicts the attainment of the same workloads and arrivals for 1P+1D and
colocated: its fidelity against the measurement.

    python -m benchmarks.goodput [--vllm-python /tmp/vllm-venv/bin/python] [--only chatbot]
    python -m benchmarks.goodput --only chatbot-fidelity --repeat 2 [--systems colocated]

Everything goes to benchmarks/results/goodput/<workload>/: plots, summary.json (attainment per
rate and goodput of each system), and the raw data git does not keep: results.json (every
request), the step logs and the server logs. What the fidelity rows simulate with is kept:
the latency models fitted to the step logs (fits/, without their samples) and the machine's
speed drift read from them (in fidelity.json), so `--fidelity-only` re-simulates every row on a
clone that has none of the raw data (it refits where the step logs are there). SLOs are K x the
unloaded TTFT and TPOT of the colocated server (the first system), K given per workload below.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.checkpoints import smollm2_folder
from distserve.config import build_deployment
from distserve.planner.latency_model import FittedLatencyModel
from distserve.planner.profile import fit_step_logs, read_step_log

RESULTS = Path("benchmarks/results/goodput")
# how far a few percent of step time (this machine's drift between runs) move the simulated
# attainment: the calibrated models also simulated this many times slower
SENSITIVITY = (0.97, 1.03)
DRIFT_WINDOW = 20.0  # seconds of serving over which the machine's speed is read (`speed_drift`)
DRIFT_MIN_STEPS = 100  # a window with fewer decode steps (mostly idle) is not read
DRIFT_SAMPLES = 64  # draws of the machine's speed a drifting simulation averages over
LOGS = {"colocated": ["colocated-0"], "disaggregated": ["prefill-0", "decode-0"]}  # each system's step logs
DISTSERVE = [sys.executable, "-m", "distserve.entrypoints.cli"]
VLLM_ENV = "VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_TARGET_DEVICE=cpu VLLM_LOGGING_LEVEL=WARNING"

WORKLOADS = {
    # ShareGPT first turns, as the paper's chatbot workload
    "chatbot": {
        "workload": ["--workload", "sharegpt", "--num-requests", "24", "--max-model-len", "1024", "--max-prompt-len", "768"],
        "rates": ["0.3", "0.6", "0.9", "1.2", "1.8"],
        "slo_multiple": "5",
    },
    # the planner's fidelity at a finer grain: the chatbot workload with 3x the requests (one
    # request = 1.4 points of attainment), fixed rates, only the two systems it simulates; also
    # simulated with latency models fitted to a calibration run's step logs (other requests:
    # workload seed 1, one rate), to a second one over two rates, to both pooled, and to both
    # pooled on a machine drifting as they read (`speed_drift`)
    "chatbot-fidelity": {
        "workload": ["--workload", "sharegpt", "--num-requests", "72", "--max-model-len", "1024", "--max-prompt-len", "768"],
        "rates": ["0.3", "0.6", "0.9", "1.2", "1.8"],
        "slo_multiple": "5",
        "systems": ["colocated", "disaggregated"],
        "search": "0",
        "vllm": False,
        "calibration": {"seed": "1", "rates": ["1.2"]},
        # a second calibration over two rates between the measured ones: steps at different
        # loads, as the runs it predicts have
        "calibration_wide": {"seed": "1", "rates": ["0.75", "1.5"]},
    },
    # long prompts, short outputs, as the paper's LongBench summarization workload
    "summarization": {
        "workload": ["--workload", "synthetic:uniform:384:768:16:48", "--num-requests", "16", "--max-model-len", "1024"],
        "rates": ["0.2", "0.4", "0.8"],
        "slo_multiple": "5",
    },
}


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def run_quiet(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def profile(model: Path, threads: int) -> Path:
    out = RESULTS / f"profile-{threads}thread.json"
    if not out.exists():
        run(DISTSERVE + ["profile", str(model), "--threads", str(threads), "--max-model-len", "2048", "--out", str(out)])
    return out


def logged_systems(out: Path, names: list[str]) -> list[str]:
    """`bench compare` systems that log every step to out/steps-<system>/ (emptied first: the
    logs append)."""
    for system in names:
        shutil.rmtree(out / f"steps-{system}", ignore_errors=True)
    return [f"{s}=--mode {s} --step-log {out / f'steps-{s}'}" for s in names]


def compress_step_logs(out: Path) -> None:
    """Keep the step logs gzipped (a run's log is megabytes of JSON lines)."""
    for path in out.glob("steps-*/*.jsonl"):
        path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()


def compare(model: Path, name: str, spec: dict, vllm_python: str, out: Path | None = None,
            systems: list[str] | None = None, slos: tuple[float, float] | None = None) -> Path:
    """The workload's runs of every system into `out` (default its folder); SLOs `slos`, or
    the workload's multiple of the first system's unloaded latency."""
    out = out or RESULTS / name
    systems_args = logged_systems(out, systems or spec.get("systems", ["colocated", "disaggregated", "chunked"]))
    slo_args = ["--ttft", str(slos[0]), "--tpot", str(slos[1])] if slos else ["--slo-multiple", spec["slo_multiple"]]
    command = DISTSERVE + ["bench", "compare", str(model), "--systems", *systems_args,
                           "--server-args", "--max-model-len 2048", *spec["workload"], "--rates", *spec["rates"],
                           "--search", spec.get("search", "1"), *slo_args, "--devices", "2", "--out", str(out)]
    if spec.get("vllm", True) and Path(vllm_python).exists():
        # every rate re-sends the same prompts: vLLM's prefix cache would skip their prefills
        # from the second run on (distserve has no prefix cache), so it is off
        vllm = (f"{VLLM_ENV} {vllm_python} -m vllm.entrypoints.openai.api_server --model {model} --dtype float32 "
                f"--max-model-len 2048 --no-enable-prefix-caching --port {{port}}")
        command += ["--vllm-command", vllm]
    elif spec.get("vllm", True):
        print(f"vLLM skipped: {vllm_python} not found")
    run(command)
    compress_step_logs(out)
    return out / "results.json"


def repeats(base: Path) -> list[Path]:
    """`base` and its repeats (`--repeat`: base/repeat-1, repeat-2, ...), in order."""
    return [base] + sorted(base.glob("repeat-*"), key=lambda p: int(p.name.split("-")[1]))


def run_summary(folder: Path) -> dict:
    """A run's settings and per-system results (`distserve bench` writes summary.json)."""
    return json.loads((folder / "summary.json").read_text())


def measured_in(base: Path, system: str) -> list[Path]:
    """The measurements (`repeats`) that ran `system`."""
    return [f for f in repeats(base) if system in run_summary(f)["systems"]]


def fitted(logs: list[Path], path: Path) -> Path:
    """A latency model fitted to these step logs (`distserve profile --step-log`), kept at
    `path` without its samples (megabytes; a fit takes seconds); with no logs here (git does
    not keep them), the model kept there before."""
    if logs:
        model = fit_step_logs(logs)
        model.samples = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no fit kept and no step logs to fit it to; run the benchmark first.")
    return path


def fit_logged(bases: list[Path], systems: list[str], dest: Path) -> dict[str, str]:
    """Latency models fitted to the steps each system logged in `bases` and their repeats,
    pooled, kept in the folder `dest`, as `distserve simulate --latency` arguments."""
    return {system: f"fitted:all={fitted(step_logs(bases, system), dest / f'fitted-{system}.json')}" for system in systems}


def step_logs(bases: list[Path], system: str) -> list[Path]:
    """The step logs `system` wrote in `bases` and their repeats."""
    return [log for base in bases for folder in measured_in(base, system)
            for log in sorted((folder / f"steps-{system}").glob("*.jsonl.gz"))]


def calibrations(name: str, spec: dict) -> dict[str, Path]:
    """The workload's calibration specs (`calibration`, `calibration_wide`), each with its folder."""
    return {key: RESULTS / name / key.replace("_", "-") for key in ("calibration", "calibration_wide") if key in spec}


def calibration_run(model: Path, spec: dict, slos: tuple[float, float], out: Path, systems: list[str],
                    key: str) -> None:
    cal = spec[key]
    run(DISTSERVE + ["bench", "compare", str(model), "--systems", *logged_systems(out, systems),
                     "--server-args", "--max-model-len 2048", *spec["workload"], "--seed", cal["seed"],
                     "--rates", *cal["rates"], "--ttft", str(slos[0]), "--tpot", str(slos[1]),
                     "--devices", "2", "--out", str(out)])
    compress_step_logs(out)


def calibrate(model: Path, name: str, spec: dict, slos: tuple[float, float], rerun: bool, key: str,
              fits: Path) -> dict[str, str]:
    """Latency models fitted (into fits/key) to the steps each system logged serving the
    calibration run `key` (all its repeats pooled)."""
    out = calibrations(name, spec)[key]
    if rerun or not (out / "summary.json").exists():
        calibration_run(model, spec, slos, out, spec["systems"], key)
    return fit_logged([out], spec["systems"], fits / key)


def calibrated_fidelity(model: Path, name: str, spec: dict, rerun: bool) -> dict:
    """A fidelity workload simulated with latency models fitted to serving step logs: of its
    calibration runs (each kind, then all pooled, steady and drifting), scaled a few percent,
    cross-validated over rates, and of the measured runs' own steps (steady and drifting)."""
    summary = {}
    slos = first_slos(name)
    fits = RESULTS / name / "fits"
    calibrated = calibrate(model, name, spec, slos, rerun, "calibration", fits)
    summary[f"{name} (calibrated on step logs)"] = fidelity(model, name, spec, calibrated, "-calibrated")
    if "calibration_wide" in spec:
        wide = calibrate(model, name, spec, slos, rerun, "calibration_wide", fits)
        summary[f"{name} (calibrated on step logs at several rates)"] = fidelity(model, name, spec, wide, "-calibrated-wide")
        # every calibration run and repeat pooled: the most steps, at three rates, over the
        # longest stretch of the machine's drifting speed; then on a machine whose speed
        # wanders as it did in those runs
        folders = list(calibrations(name, spec).values())
        pooled = fit_logged(folders, spec["systems"], fits / "pooled")
        summary[f"{name} (calibrated on every calibration run)"] = fidelity(model, name, spec, pooled, "-calibrated-pooled")
        drift = speed_drift(pooled, folders, f"{name} (machine speed while calibrating)")
        summary[f"{name} (machine speed while calibrating)"] = drift
        summary[f"{name} (calibrated on every calibration run, with its speed drift)"] = fidelity(
            model, name, spec, pooled, "-calibrated-pooled-drift", drift=drift)
    for scale in SENSITIVITY:
        summary[f"{name} (calibrated, every step {scale:g}x)"] = fidelity(
            model, name, spec, calibrated, f"-calibrated-x{scale:g}", scale)
    summary[f"{name} (cross-validated over rates)"] = cross_validated(model, name, spec)
    # the runs' own steps: what is left is the simulator's error, not the latency model's
    own = fit_logged([RESULTS / name], spec["systems"], fits / "own-steps")
    summary[f"{name} (fitted on the measured runs' own steps)"] = fidelity(model, name, spec, own, "-own-steps")
    drift = speed_drift(own, [RESULTS / name], f"{name} (machine speed while serving)")
    summary[f"{name} (machine speed while serving)"] = drift
    summary[f"{name} (fitted on the measured runs' own steps, with their speed drift)"] = fidelity(
        model, name, spec, own, "-own-steps-drift", drift=drift)
    return summary


def repeat(model: Path, name: str, spec: dict, vllm_python: str, times: int, systems: list[str]) -> None:
    """`times` more measurements of the workload's runs and of each of its calibration runs, one
    after the other (a drift of the machine's speed then reaches them alike), at the first run's
    SLOs."""
    slos = first_slos(name)
    for _ in range(times):
        n = len(repeats(RESULTS / name))
        compare(model, name, spec, vllm_python, RESULTS / name / f"repeat-{n}", systems, slos)
        for key, folder in calibrations(name, spec).items():
            calibration_run(model, spec, slos, folder / f"repeat-{n}", systems, key)


def split_by_run(steps: list[dict], runs: list[dict]) -> list[list[dict]]:
    """One instance's logged steps cut into the benchmark's runs (they run one after another):
    walking back from the end, a run's decode steps hold one token per output token after the
    first of each of its requests; the steps before the first run (SLO calibration) are dropped."""
    parts, end = [], len(steps)
    for run in reversed(runs):
        tokens, start = sum(max(0, r["output_len"] - 1) for r in run["requests"]), end
        while start > 0 and tokens > 0:
            start -= 1
            tokens -= len(steps[start]["decode"])
        while start > 0 and not steps[start - 1]["decode"]:
            start -= 1  # the run's first prefills
        parts.append(steps[start:end])
        end = start
    return parts[::-1]


def split_logs(folder: Path, system: str) -> list[list[list[dict]]] | None:
    """Each of the system's step logs in `folder`, cut into its runs (by rate); None when the
    logs are not here (the raw results.json, whose requests tell where a run ends, is there
    whenever they are)."""
    if not (folder / "results.json").exists():
        return None
    runs = sorted(json.loads((folder / "results.json").read_text())["systems"][system]["runs"], key=lambda r: r["rate"])
    per_log = []
    for log in LOGS[system]:
        path = folder / f"steps-{system}" / f"{log}.jsonl.gz"
        if not path.exists():
            return None
        steps = read_step_log(path)
        # no decodes to count on the prefill instance: cut where the decode instance's runs start
        per_log.append(steps if log == "prefill-0" else split_by_run(steps, runs))
    if system == "disaggregated":
        starts = [part[0]["start"] for part in per_log[1]] + [float("inf")]
        prefill = per_log[0]
        # a run's prefills come before its first decode by at most one TTFT SLO and a pull
        per_log[0] = [[s for s in prefill if starts[k] - 10 <= s["start"] < starts[k + 1] - 10] for k in range(len(runs))]
    return per_log


def runs_by_rate(folder: Path, system: str) -> list[dict]:
    return sorted(run_summary(folder)["systems"][system]["runs"], key=lambda r: r["rate"])


def first_slos(name: str) -> tuple[float, float]:
    """The (TTFT, TPOT) SLOs of the workload's first measurement, which its repeats reuse."""
    settings = run_summary(RESULTS / name)["settings"]
    return settings["ttft_slo"], settings["tpot_slo"]


def cross_validated(tokenizer: Path, name: str, spec: dict) -> dict:
    """Each rate simulated with latency models fitted to the steps logged at the other rates
    (in every repeat), against the mean measured attainment."""
    ttft, tpot = first_slos(name)
    out: dict = {}
    for system in ("colocated", "disaggregated"):
        measured = [(runs_by_rate(f, system), f) for f in measured_in(RESULTS / name, system)]
        split = [split_logs(folder, system) for _, folder in measured]
        logged = all(part is not None for part in split)
        rows = []
        for k, run in enumerate(measured[0][0]):
            folder = Path(tempfile.mkdtemp(prefix=f"cross-validated-{system}-"))  # the logs of 4 runs: not kept
            files = []
            for i, log in enumerate(LOGS[system] if logged else []):
                path = folder / f"{log}.jsonl"
                path.write_text("".join(json.dumps(step) + "\n" for per_log in split
                                        for m, part in enumerate(per_log[i]) if m != k for step in part))
                files.append(path)
            model = fitted(files, RESULTS / name / "fits" / "cross-validated" / f"fitted-{system}-{run['rate']:g}.json")
            sim_out = folder / "simulated.json"
            run_quiet(DISTSERVE + ["simulate", "--config", str(RESULTS / f"{name}-{system}.json"), "--latency", f"fitted:all={model}",
                                   "--cluster", "1x2xcpu", "--dtype-bytes", "4", *spec["workload"], "--rates", str(run["rate"]),
                                   "--ttft", str(ttft), "--tpot", str(tpot), "--tokenizer", str(tokenizer), "--out", str(sim_out)])
            simulated = json.loads(sim_out.read_text())["rows"][0]["attainment"]
            shutil.rmtree(folder)
            rows.append(row(run["rate"], [runs[k]["attainment"] for runs, _ in measured], simulated))
        out[system] = summarize(f"{name} (cross-validated) {system}", rows)
    return out


def speed_drift(fits: dict[str, str], bases: list[Path], label: str) -> dict:
    """How far the machine's speed wanders while serving: the decode steps each system logged in
    `bases` and their repeats, cut into DRIFT_WINDOW-second windows, each window's time over
    what `fitted` (one model over all those steps) predicts for it. A steady machine reads 1.0
    in every window, give or take the fit's error on the batch shapes a window happens to hold
    (so this reads the drift high, if anything). Without the step logs here, the reading
    fidelity.json kept under `label`."""
    if not all(step_logs(bases, system) for system in fits):
        return json.loads((RESULTS / "fidelity.json").read_text())[label]
    out = {}
    for system, latency in fits.items():
        model = FittedLatencyModel.load(latency.split("=", 1)[1])
        ratios = []
        for path in step_logs(bases, system):
            windows: dict[int, list[float]] = {}
            steps = [s for s in read_step_log(path) if s["decode"] and not s["prefill"]]
            for step in steps:
                window = windows.setdefault(int((step["start"] - steps[0]["start"]) // DRIFT_WINDOW), [0, 0.0, 0.0])
                window[0] += 1
                window[1] += step["seconds"]
                window[2] += model.decode_time(step["decode"])
            ratios += [measured / predicted for n, measured, predicted in windows.values() if n >= DRIFT_MIN_STEPS]
        out[system] = {"windows": len(ratios), "stdev": statistics.stdev(ratios), "min": min(ratios), "max": max(ratios)}
        print(f"{system}: decode speed over {len(ratios)} windows of {DRIFT_WINDOW:g} s: sd {out[system]['stdev']:.3f}, "
              f"{out[system]['min']:.2f}-{out[system]['max']:.2f} x the fit over all of them")
    return out


def row(rate: float, measured: list[float], simulated: float) -> dict:
    """One rate of a fidelity table: the mean of the measurements against the simulation."""
    out = {"rate": rate, "measured": statistics.fmean(measured), "simulated": simulated}
    return {**out, "measured_runs": measured} if len(measured) > 1 else out


def summarize(title: str, rows: list[dict]) -> dict:
    """Measured against simulated attainment by rate, printed, and the largest gap in points."""
    worst = max(abs(r["measured"] - r["simulated"]) for r in rows)
    print(f"{title}: " + ", ".join(f"{r['rate']:g}: {100 * r['measured']:.0f}% vs {100 * r['simulated']:.0f}%" for r in rows)
          + f" (max error {100 * worst:.1f} points)")
    return {"rows": rows, "max_abs_error_points": 100 * worst}


def fidelity(model: Path, name: str, spec: dict, latency: dict[str, str], label: str, scale: float = 1.0,
             drift: dict | None = None) -> dict:
    """Simulated vs measured attainment (the mean over repeats) at every rate the benchmark ran,
    for 1P+1D and colocated; `scale`: every simulated step that many times as long; `drift`
    (`speed_drift`'s reading): the machine's speed wandering that much, every DRIFT_WINDOW s."""
    ttft, tpot = first_slos(name)
    out: dict = {}
    for system in ("disaggregated", "colocated"):  # each system is the distserve mode of its name
        measured = [runs_by_rate(f, system) for f in measured_in(RESULTS / name, system)]
        rates = [r["rate"] for r in measured[0]]
        config = RESULTS / f"{name}-{system}.json"
        build_deployment(str(model), system, max_model_len=2048).save(config)
        sim_out = RESULTS / f"{name}-{system}-simulated{label}.json"
        run(DISTSERVE + ["simulate", "--config", str(config), "--latency", latency[system], "--cluster", "1x2xcpu",
                         "--dtype-bytes", "4", *spec["workload"], "--rates", *map(str, rates),
                         "--ttft", str(ttft), "--tpot", str(tpot), "--tokenizer", str(model), "--latency-scale", str(scale),
                         *(["--speed-drift", str(drift[system]["stdev"]), "--drift-window", str(DRIFT_WINDOW),
                            "--drift-samples", str(DRIFT_SAMPLES)] if drift else []),
                         "--out", str(sim_out)])
        simulated = {r["rate"]: r["attainment"] for r in json.loads(sim_out.read_text())["rows"]}
        rows = [row(rate, [runs[k]["attainment"] for runs in measured], simulated[rate]) for k, rate in enumerate(rates)]
        out[system] = summarize(f"{name}{label} {system}", rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--models-dir", default="/tmp/distserve-bench-models")
    parser.add_argument("--fidelity-only", action="store_true", help="only re-simulate the measured runs")
    parser.add_argument("--repeat", type=int, default=0, metavar="N",
                        help="measure a fidelity workload's runs and its calibration run N more times (next to the "
                        "stored ones), then simulate against the mean of every measurement")
    parser.add_argument("--systems", nargs="+", choices=("colocated", "disaggregated"), default=None,
                        help="only these systems in the repeats (default: the workload's)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = smollm2_folder(Path(args.models_dir))
    profiles = {1: profile(model, 1), 2: profile(model, 2)}
    summary = {}
    for name, spec in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        if args.repeat and "calibration" in spec:
            repeat(model, name, spec, args.vllm_python, args.repeat, args.systems or spec["systems"])
        elif args.repeat:
            print(f"{name}: no repeats (not a fidelity workload), only simulated")
        elif not args.fidelity_only:
            for old in repeats(RESULTS / name)[1:] + [r for f in calibrations(name, spec).values() for r in repeats(f)[1:]]:
                shutil.rmtree(old)  # repeats of the measurement this one replaces
            compare(model, name, spec, args.vllm_python)
        measure_anew = not (args.fidelity_only or args.repeat)
        grid = {"disaggregated": f"fitted:prefill={profiles[1]},decode={profiles[1]}", "colocated": f"fitted:all={profiles[2]}"}
        summary[name] = fidelity(model, name, spec, grid, "")
        if "calibration" in spec:
            summary.update(calibrated_fidelity(model, name, spec, measure_anew))
        path = RESULTS / "fidelity.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **summary}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
