"""The planner's commands: `distserve profile` (fit a latency model to this engine),
`distserve plan` (search placements) and `distserve simulate` (a placement file's attainment
at several rates)."""

from __future__ import annotations

import argparse
from pathlib import Path

from distserve.config import QUANTIZATIONS, available_cores
from distserve.entrypoints.cli_bench import add_arrival_args, add_workload_args, load_workload_from_args


def _lengths(args: argparse.Namespace) -> list[tuple[int, int]]:
    requests, _ = load_workload_from_args(args)
    return [(r.prompt_len, r.output_len) for r in requests]


def cmd_profile(args: argparse.Namespace) -> None:
    from distserve.planner.profile import ProfileGrid, fit_step_logs, profile_engine

    if args.step_log:
        model = fit_step_logs(args.step_log)
    else:
        grid = ProfileGrid.quick() if args.quick else ProfileGrid()
        model = profile_engine(args.model, args.threads, grid, args.max_model_len, quantization=args.quantization)
    model.save(args.out)
    print(f"prefill: {model.prefill}, decode below {model.threshold}: {model.decode_small}, above: {model.decode_large}")
    print(f"fit error (mean relative): prefill {model.fit_error['prefill']:.1%}, decode {model.fit_error['decode']:.1%}")
    print(f"wrote {args.out}")


def _problem(args: argparse.Namespace, lengths: list[tuple[int, int]]):  # noqa: ANN202 - PlanProblem
    from distserve.planner.hardware import Cluster, model_shape
    from distserve.planner.search import PlanProblem

    return PlanProblem(
        shape=model_shape(args.plan_model), cluster=Cluster.parse(args.cluster), lengths=lengths,
        ttft=args.ttft, tpot=args.tpot, target=args.attainment, criterion=args.criterion, latency=args.latency,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs, calibration=args.calibration,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    """Every mode's best placement on the same latency model, and the best one's placement file."""
    import json

    from distserve.planner.search import best_colocated, choose_mode

    lengths = _lengths(args)
    problem = _problem(args, lengths)
    algorithms = [1, 2] if args.algorithm == "both" else [int(args.algorithm)]
    modes = [m for m in (args.modes or ["disaggregated", "colocated", "chunked"])]
    plans = [p for p in choose_mode(problem, args.rate, algorithms if "disaggregated" in modes else []) if str(p.mode) in modes]
    if not plans:
        raise ValueError(f"no placement of {', '.join(modes)} meets the SLOs at {args.rate} req/s on this cluster.")
    for plan in plans:
        if plan.placement is not None:
            print(f"\ndisaggregated, algorithm {plan.placement.algorithm}: candidates, best per device first")
            print(f"  {'kind':<8} {'prefill':>9} {'decode':>9} {'goodput':>9} {'per dev':>9}")
            for c in sorted(plan.placement.candidates, key=lambda c: -c.per_device)[: args.top]:
                fmt = lambda par: f"{par.tp}x{par.pp}" if par else "-"  # noqa: E731
                print(f"  {c.kind:<8} {fmt(c.prefill):>9} {fmt(c.decode):>9} {c.goodput:>9.3f} {c.per_device:>9.3f}")
    print(f"\nmodes on the same latency model ({args.latency}), best first, for {args.rate:g} req/s:")
    print(f"  {'mode':<14} {'placement':<52} {'devices':>7} {'goodput':>8} {'per device':>10}")
    for plan in plans:
        print(f"  {str(plan.mode):<14} {plan.describe():<52} {plan.devices:>7} {plan.goodput:>8.3f} {plan.per_device_goodput:>10.3f}")
    best = plans[0]
    reference = None
    if args.latency == "published":  # the 2023 vLLM engine's own profile, where the authors published one
        vllm_problem = _problem(args, lengths)
        vllm_problem.latency = "published-vllm"
        reference = best_colocated(vllm_problem, progress=True)
        print(f"  {'vLLM profile':<14} {f'TP{reference.prefill.tp}PP{reference.prefill.pp} (colocated, the published vLLM engine)':<52} "
              f"{reference.devices:>7} {reference.goodput:>8.3f} {reference.per_device:>10.3f}")
    reason = ", ".join(f"{p.mode} {p.per_device_goodput:.3f}" for p in plans)
    print(f"\nchose {best.mode}: the most goodput per device ({reason} req/s per device)")
    plan_file = {
        "deployment": best.deployment(args.model, problem).to_dict(),
        "plan": {
            "mode": str(best.mode), "placement": best.describe(), "cluster": args.cluster, "latency": args.latency, "rate": args.rate,
            "ttft": args.ttft, "tpot": args.tpot, "attainment": args.attainment, "criterion": args.criterion,
            "goodput": best.goodput, "per_device_goodput": best.per_device_goodput, "devices": best.devices,
            "modes": {str(p.mode): {"placement": p.describe(), "devices": p.devices, "goodput": p.goodput,
                                    "per_device_goodput": p.per_device_goodput} for p in plans},
            "reason": f"the most goodput per device of the modes that sustain {args.rate:g} req/s: {reason}",
            "vllm_profile_per_device_goodput": reference.per_device if reference else None,
        },
    }
    Path(args.out).write_text(json.dumps(plan_file, indent=2))
    print(f"wrote {args.out} (distserve serve --config {args.out})")
    if args.plot:
        _plot_plan(problem, plans, args.plot)


def _plot_plan(problem, plans, path: str) -> None:  # noqa: ANN001 - a PlanProblem, ModePlans
    """Simulated attainment against rate per device, of each mode's placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for plan in plans:
        spec = plan.cluster_spec(problem)
        rates = [plan.goodput * f for f in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)]
        attain = [problem.attainment(problem.run(spec, r)) for r in rates]
        ax.plot([r / plan.devices for r in rates], [100 * a for a in attain], marker="o", label=f"{plan.mode}: {plan.describe()}")
    ax.axhline(100 * problem.target, color="gray", linestyle="--")
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("simulated SLO attainment (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulated attainment of a placement file's deployment at each rate."""
    import json
    from dataclasses import replace

    from distserve.bench.arrivals import arrival_times
    from distserve.bench.metrics import slo_attainment
    from distserve.config import DeploymentConfig
    from distserve.planner.deployment import fitted_phase_model, simulated_cluster
    from distserve.planner.hardware import model_shape
    from distserve.planner.simulator import SpeedDrift, simulate

    if args.speed_drift < 0 or args.drift_window <= 0 or args.drift_samples < 1:
        raise ValueError("--speed-drift must be >= 0, --drift-window > 0 seconds and --drift-samples >= 1.")
    deployment = DeploymentConfig.load(args.config)
    requests, _ = load_workload_from_args(args)
    lengths = [(r.prompt_len, r.output_len) for r in requests]
    shape = model_shape(args.plan_model or deployment.model)
    kv_bytes = shape.kv_bytes_per_token(args.dtype_bytes)
    if args.latency.startswith("fitted:"):
        files = dict(item.split("=", 1) for item in args.latency[len("fitted:"):].split(","))
        phase_model = fitted_phase_model(files, kv_bytes, args.latency_scale)
    else:
        problem = _problem(argparse.Namespace(**{**vars(args), "plan_model": shape.name}), lengths)
        phase_model = problem.phase_model(args.latency_scale)
    spec = simulated_cluster(deployment, phase_model, kv_bytes, lambda tokens: tokens * kv_bytes / args.transfer_bandwidth)
    rows = []
    print(f"{'rate':>8} {'attainment':>11} {'TTFT ok':>8} {'TPOT ok':>8}")
    # a steady machine once; a drifting one over several draws of its speed (the same arrivals)
    speeds = ([SpeedDrift(args.speed_drift, args.drift_window, seed) for seed in range(args.drift_samples)]
              if args.speed_drift else [None])
    for rate in args.rates:
        trace = [r.arrival_time for r in requests] if args.arrival == "trace" else None
        arrivals = arrival_times(len(lengths), rate, args.arrival, args.cv, args.seed, trace)
        draws = [slo_attainment(simulate(replace(spec, speed=speed), arrivals, lengths), args.ttft, args.tpot) for speed in speeds]
        both, ttft, tpot = (sum(getattr(a, part) for a in draws) / len(draws) for part in ("both", "ttft", "tpot"))
        rows.append({"rate": rate, "attainment": both, "ttft_attainment": ttft, "tpot_attainment": tpot})
        print(f"{rate:>8.3g} {both:>11.1%} {ttft:>8.1%} {tpot:>8.1%}")
    if args.out:
        drift = {"speed_drift": args.speed_drift, "drift_window": args.drift_window, "drift_samples": args.drift_samples}
        Path(args.out).write_text(json.dumps({"config": args.config, "latency": args.latency, "latency_scale": args.latency_scale,
                                              **(drift if args.speed_drift else {}), "rows": rows}, indent=2))
        print(f"wrote {args.out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Fit the analytical model's weights to measured steps and print its error."""
    from distserve.planner.calibration import fit_calibration, profile_samples, published_samples
    from distserve.planner.hardware import DEVICES, model_shape
    from distserve.planner.latency_model import FittedLatencyModel

    device = DEVICES[args.device]
    if args.profile:
        if not args.model:
            raise ValueError("--profile needs --model (the shape the profile ran) and --tp.")
        samples = [s for path in args.profile for s in profile_samples(FittedLatencyModel.load(path), model_shape(args.model), args.tp)]
        source = f"{', '.join(args.profile)} ({args.model}, TP {args.tp})"
    else:
        samples = published_samples()
        source = "DistServe's published A100-80GB profiles"
    calibration = fit_calibration(samples, device, source)
    for phase, err in calibration.error.items():
        print(f"{phase}: held-out error median {err['median']:.1%}, worst {err['worst']:.1%} over {err['steps']} steps")
    calibration.save(args.out)
    print(f"wrote {args.out} (distserve plan --latency analytical --calibration {args.out})")


def add_plan_args(p: argparse.ArgumentParser, with_rate: bool) -> None:
    p.add_argument("--cluster", default="1x4xa100-80gb", help="NODESxDEVICES[xKIND]; kinds: a100-80gb, h100, h200, cpu")
    p.add_argument("--latency", default="analytical",
                   help="analytical (a roofline calibrated on measured steps, --calibration) | roofline (uncalibrated) | "
                   "published (DistServe's A100 profiles) | fitted:PROFILE.json (from distserve profile)")
    p.add_argument("--calibration", default=None, metavar="JSON",
                   help="the analytical model's calibration (`distserve calibrate`; default: fitted to the published A100 profiles)")
    p.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--criterion", choices=("joint", "separate"), default="joint",
                   help="joint: TTFT and TPOT met together; separate: each met by the share (DistServe's simulator)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    if with_rate:
        p.add_argument("--rate", type=float, required=True, help="request rate the placement must sustain (req/s)")


def register(sub: argparse._SubParsersAction) -> None:
    profile = sub.add_parser("profile", help="fit a latency model to this engine's steps on this machine",
                             description="Time this engine's prefill and decode steps over a grid of batches and fit "
                             "prefill = a + b*sum(l) + c*sum(l^2), decode = a + b*sum(context) + c*B.")
    profile.add_argument("model", nargs="?", default=None)
    profile.add_argument("--threads", type=int, default=len(available_cores()), help="torch threads (cores of one instance)")
    profile.add_argument("--max-model-len", type=int, default=None)
    profile.add_argument("--quick", action="store_true", help="a small grid")
    profile.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                         help="the weights to profile, as `serve --quantization` runs them (default auto)")
    profile.add_argument("--step-log", nargs="+", metavar="JSONL", default=None,
                         help="fit to the steps a server ran (files `serve --step-log` wrote) instead of timing a grid")
    profile.add_argument("--out", default="profile.json")
    profile.set_defaults(func=cmd_profile)

    calibrate = sub.add_parser("calibrate", help="fit the planner's analytical model to measured steps",
                               description="Fit the analytical latency model's weights (compute and memory efficiency, "
                               "per-step, per-layer and all-reduce costs) to measured steps: DistServe's published A100 "
                               "profiles, or `distserve profile` JSON files of a GPU of yours. Half the steps are held out "
                               "and the error on them printed.")
    calibrate.add_argument("--profile", nargs="+", metavar="JSON", help="distserve profile output(s) (default: the published profiles)")
    calibrate.add_argument("--model", default=None, help="the model the profiles ran (config folder or known id)")
    calibrate.add_argument("--tp", type=int, default=1, help="their tensor-parallel degree")
    calibrate.add_argument("--device", default="a100-80gb", help="the device kind they ran on (planner/hardware.py)")
    calibrate.add_argument("--out", default="calibration.json")
    calibrate.set_defaults(func=cmd_calibrate)

    plan = sub.add_parser("plan", help="choose the goodput-optimal placement for a workload and SLOs",
                          description="Search prefill/decode parallelism and instance counts with the simulator "
                          "(Algorithm 1 and 2 of DistServe) and write a placement file for `distserve serve --config`.")
    plan.add_argument("--model", dest="plan_model", required=True, help="config.json folder or a known id (facebook/opt-66b, ...)")
    plan.add_argument("--serve-model", dest="model", default=None, help="model path written into the placement file")
    plan.add_argument("--algorithm", choices=("1", "2", "both"), default="both", help="disaggregated placement search")
    plan.add_argument("--modes", nargs="+", choices=("disaggregated", "colocated", "chunked"), default=None,
                      help="modes to search (default: all three; the best per device is written)")
    plan.add_argument("--top", type=int, default=8, help="candidates shown per algorithm")
    plan.add_argument("--plot", default=None, help="PNG of the chosen placement's simulated attainment curve")
    plan.add_argument("--out", default="placement.json", help="the placement file to write")
    add_plan_args(plan, with_rate=True)
    add_workload_args(plan)
    plan.set_defaults(func=cmd_plan, tokenizer_model=None)

    simulate = sub.add_parser("simulate", help="simulate a placement file at several rates",
                              description="Simulated SLO attainment of a deployment (placement file) at each rate.")
    simulate.add_argument("--config", required=True, help="placement file")
    simulate.add_argument("--model", dest="plan_model", default=None, help="model shape (default: the file's model)")
    simulate.add_argument("--dtype-bytes", type=int, default=4, help="bytes per KV element (4 on CPU, 2 on GPU)")
    simulate.add_argument("--transfer-bandwidth", type=float, default=5e9, help="KV pull bandwidth, bytes/s")
    simulate.add_argument("--latency-scale", type=float, default=1.0, metavar="F",
                          help="every step F times as long (a machine F times slower; 0.95: 5%% faster)")
    simulate.add_argument("--speed-drift", type=float, default=0.0, metavar="SD",
                          help="the machine's speed wanders: each --drift-window seconds every step takes a log-normal "
                          "factor of mean 1 and this standard deviation; attainment is the mean over --drift-samples draws")
    simulate.add_argument("--drift-window", type=float, default=20.0, metavar="S")
    simulate.add_argument("--drift-samples", type=int, default=16, metavar="N")
    simulate.add_argument("--out", default=None, help="JSON of the simulated attainment per rate")
    add_plan_args(simulate, with_rate=False)
    add_workload_args(simulate)
    add_arrival_args(simulate)
    simulate.set_defaults(func=cmd_simulate, tokenizer_model=None)
