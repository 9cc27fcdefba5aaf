"""The offline tools of the command line: `distserve bench` (SLO attainment and goodput of
servers), `distserve profile`, `distserve plan` and `distserve simulate` (the planner)."""

from __future__ import annotations

import argparse
from pathlib import Path

from distserve.config import available_cores


def _tokenizer(args: argparse.Namespace):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    from distserve.tokenizer import load_tokenizer
    from distserve.weights.source import load_model_config

    # the planner builds lengths with the built-in tokenizer unless told otherwise: the model
    # it plans for may be a shape only (a hub id with no network here)
    model = args.tokenizer_model if hasattr(args, "tokenizer_model") else args.model
    return load_tokenizer(load_model_config(model))


def _workload(args: argparse.Namespace):  # noqa: ANN202 - (requests, description)
    from distserve.bench.workloads import WorkloadSpec, load_workload

    spec = WorkloadSpec.parse(
        args.workload,
        num_requests=args.num_requests,
        max_model_len=args.max_model_len,
        max_prompt_len=args.max_prompt_len,
        output_len=args.output_len,
        seed=args.seed,
    )
    requests = load_workload(spec, _tokenizer(args))
    if not requests:
        raise ValueError(f"workload {args.workload} gave no requests after filtering.")
    described = {
        "name": args.workload, "requests": len(requests),
        "mean_prompt_len": sum(r.prompt_len for r in requests) / len(requests),
        "mean_output_len": sum(r.output_len for r in requests) / len(requests),
    }
    print(f"workload {args.workload}: {len(requests)} requests, mean prompt {described['mean_prompt_len']:.0f} "
          f"tokens, mean output {described['mean_output_len']:.0f} tokens")
    return requests, described


def _settings(args: argparse.Namespace, ttft: float, tpot: float):  # noqa: ANN202 - BenchSettings
    from distserve.bench.runner import BenchSettings

    return BenchSettings(rates=args.rates, ttft_slo=ttft, tpot_slo=tpot, arrival=args.arrival, cv=args.cv,
                         seed=args.seed, target=args.target, search_iterations=args.search)


def _slos(args: argparse.Namespace, base_url: str, model: str | None, requests, api_key: str | None = None) -> tuple[float, float]:
    from distserve.bench.runner import calibrate

    if args.ttft is not None and args.tpot is not None:
        return args.ttft, args.tpot
    if args.slo_multiple is None:
        raise ValueError("give --ttft and --tpot, or --slo-multiple K to set them from the unloaded latency.")
    ttft, tpot = calibrate(base_url, model, requests, api_key)
    print(f"unloaded latency: TTFT {ttft * 1e3:.0f} ms, TPOT {tpot * 1e3:.1f} ms -> SLOs x{args.slo_multiple:g}")
    return args.ttft or ttft * args.slo_multiple, args.tpot or tpot * args.slo_multiple


def _finish(systems, settings, described: dict, args: argparse.Namespace, extra: dict) -> None:
    from distserve.bench.plots import plot_report
    from distserve.bench.runner import print_report, report, save

    data = report(systems, settings, described, args.scale_rate)
    data.update(extra)
    print_report(data)
    out = Path(args.out)
    path = save(data, out)
    plots = plot_report(data, out)
    print(f"\nwrote {path} and {len(plots)} plots in {out}/")


def cmd_bench_run(args: argparse.Namespace) -> None:
    from distserve.bench.runner import benchmark_system

    _quick(args)
    requests, described = _workload(args)
    model = args.served_model
    ttft, tpot = _slos(args, args.base_url, model, requests, args.api_key)
    settings = _settings(args, ttft, tpot)
    system = benchmark_system(args.base_url, model, requests, settings, args.name, args.devices, args.api_key)
    _finish([system], settings, described, args, {"base_url": args.base_url})


def cmd_bench_compare(args: argparse.Namespace) -> None:
    from distserve.bench.runner import Server, benchmark_system, distserve_command, free_port

    _quick(args)
    requests, described = _workload(args)
    systems_spec: list[tuple[str, list[str] | None, str]] = []
    for item in args.systems:
        name, _, extra = item.partition("=")
        mode_args = f"--mode {name}" if name in ("disaggregated", "colocated", "chunked") and not extra else extra
        systems_spec.append((name, None, f"{mode_args} {args.server_args}"))
    if args.vllm_command:
        systems_spec.append(("vllm", args.vllm_command, ""))
    results, settings, commands = [], None, {}
    out = Path(args.out)
    for name, vllm, server_args in systems_spec:
        port = free_port()
        if vllm is not None:
            command = ["bash", "-c", vllm.replace("{port}", str(port))]
        else:
            command = distserve_command(port, server_args, args.model)
        commands[name] = " ".join(command)
        print(f"\n== {name}: {commands[name]}")
        with Server(command, port, out / f"server-{name}.log") as server:
            model = server.model_name()
            if settings is None:
                settings = _settings(args, *_slos(args, server.base_url, model, requests))
            results.append(benchmark_system(server.base_url, model, requests, settings, name, args.devices))
        print(f"{name}: goodput {results[-1].goodput(settings.target):.3f} req/s")
    _finish(results, settings, described, args, {"commands": commands})


def _quick(args: argparse.Namespace) -> None:
    """--quick: a few requests at one rate, to check a setup end to end."""
    if args.quick:
        args.num_requests = min(args.num_requests, 8)
        args.rates = args.rates[:1]
        args.search = 0


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt",
                   help="sharegpt[:PATH] | sharegpt-multiturn[:PATH] | humaneval[:PATH] | longbench:PATH | trace:CSV | synthetic:SPEC "
                   "(SPEC: fixed:IN:OUT, uniform:IN_LO:IN_HI:OUT_LO:OUT_HI, lognormal:IN_MEAN:OUT_MEAN)")
    g.add_argument("--num-requests", type=int, default=100)
    g.add_argument("--max-model-len", type=int, default=2048, help="drop requests whose prompt + output exceed this")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="drop prompts longer than this")
    g.add_argument("--output-len", type=int, default=None, help="force every output to this many tokens")
    g.add_argument("--tokenizer", default=None, help="tokenizer that builds the prompts (default: the model's)")
    g.add_argument("--seed", type=int, default=0)


def add_arrival_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("arrivals")
    g.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="request rates to run (req/s)")
    g.add_argument("--arrival", choices=("poisson", "gamma", "trace"), default="poisson")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma arrivals")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    add_arrival_args(p)
    g = p.add_argument_group("SLOs and output")
    g.add_argument("--search", type=int, default=0, metavar="N",
                   help="bisection steps between the last passing and first failing rate")
    g.add_argument("--ttft", type=float, default=None, help="TTFT SLO, seconds")
    g.add_argument("--tpot", type=float, default=None, help="TPOT SLO, seconds")
    g.add_argument("--slo-multiple", type=float, default=None, help="set missing SLOs to K x the unloaded TTFT/TPOT")
    g.add_argument("--target", type=float, default=0.9, help="attainment target of goodput (default 0.9)")
    g.add_argument("--scale-rate", type=float, default=None, help="rate of the SLO-scale curve and breakdown (default: lowest)")
    g.add_argument("--devices", type=int, default=len(available_cores()), help="devices each system uses (per-device goodput)")
    g.add_argument("--out", default="bench-results", help="folder for results.json and the plots")
    g.add_argument("--quick", action="store_true", help="a few requests at one rate (a smoke test)")


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="SLO attainment and goodput benchmarks",
                           description="SLO attainment and goodput of OpenAI-compatible servers.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    run = bsub.add_parser("run", help="benchmark a running server", description="Benchmark a running OpenAI-compatible server.")
    run.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    run.add_argument("--api-key", default=None)
    run.add_argument("--served-model", default=None, help="model name in requests (default: none sent)")
    run.add_argument("--model", default=None, help="model whose tokenizer builds the prompts (default: built-in)")
    run.add_argument("--name", default="server", help="name of the system in the report")
    add_bench_args(run)
    run.set_defaults(func=cmd_bench_run)
    compare = bsub.add_parser(
        "compare", help="start each system and run the same workload on each",
        description="Start each system in turn (distserve modes, or a vLLM command line), run the same workload "
        "and arrivals against each, and report goodput and ratios.",
    )
    compare.add_argument("model", nargs="?", default=None, help="model for the distserve systems (default: built-in)")
    compare.add_argument("--systems", nargs="*", default=["disaggregated", "colocated", "chunked"],
                         help="distserve systems: disaggregated | colocated | chunked | NAME='SERVE FLAGS' "
                         "(none: only the --vllm-command system)")
    compare.add_argument("--server-args", default="", help="flags added to every distserve serve command")
    compare.add_argument("--vllm-command", default=None,
                         help="a command line that serves the same model on port {port} (run with bash)")
    add_bench_args(compare)
    compare.set_defaults(func=cmd_bench_compare)
    register_planner(sub)


__all__ = ["register"]


# -- the planner --------------------------------------------------------------------------------
def _lengths(args: argparse.Namespace) -> list[tuple[int, int]]:
    requests, _ = _workload(args)
    return [(r.prompt_len, r.output_len) for r in requests]


def cmd_profile(args: argparse.Namespace) -> None:
    from distserve.planner.profile import ProfileGrid, fit_step_logs, profile_engine

    if args.step_log:
        model = fit_step_logs(args.step_log)
    else:
        grid = ProfileGrid.quick() if args.quick else ProfileGrid()
        model = profile_engine(args.model, args.threads, grid, args.max_model_len)
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
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from distserve.planner.search import algorithm1, algorithm2, best_colocated

    lengths = _lengths(args)
    problem = _problem(args, lengths)
    placements = []
    for algorithm in ([1, 2] if args.algorithm == "both" else [int(args.algorithm)]):
        try:
            placements.append((algorithm1 if algorithm == 1 else algorithm2)(problem, args.rate))
        except ValueError as exc:
            print(f"algorithm {algorithm}: {exc}")
    if not placements:
        raise ValueError("no placement meets the SLOs at this rate on this cluster.")
    for p in placements:
        print(f"\nalgorithm {p.algorithm}: prefill TP{p.prefill.tp} PP{p.prefill.pp} x{p.num_prefill}, "
              f"decode TP{p.decode.tp} PP{p.decode.pp} x{p.num_decode}: {p.devices} devices, "
              f"goodput {p.goodput:.3f} req/s, {p.per_device_goodput:.3f} per device")
        print(f"  {'kind':<8} {'prefill':>9} {'decode':>9} {'goodput':>9} {'per dev':>9}")
        for c in sorted(p.candidates, key=lambda c: -c.per_device)[: args.top]:
            fmt = lambda par: f"{par.tp}x{par.pp}" if par else "-"  # noqa: E731
            print(f"  {c.kind:<8} {fmt(c.prefill):>9} {fmt(c.decode):>9} {c.goodput:>9.3f} {c.per_device:>9.3f}")
    best = max(placements, key=lambda p: p.per_device_goodput)
    baseline = None
    if args.latency in ("published", "analytical"):
        colocated_problem = _problem(args, lengths)
        if args.latency == "published":
            colocated_problem.latency = "published-vllm"
        baseline = best_colocated(colocated_problem, progress=True)
        print(f"\ncolocated ({'vLLM profile' if args.latency == 'published' else 'same model'}): best TP{baseline.prefill.tp} "
              f"PP{baseline.prefill.pp}, {baseline.per_device:.3f} req/s per device; "
              f"disaggregated / colocated = {best.per_device_goodput / baseline.per_device:.2f}x")
    deployment = best.deployment(args.model, args.max_num_batched_tokens, args.max_num_seqs)
    plan = {
        "deployment": deployment.to_dict(),
        "plan": {
            "algorithm": best.algorithm, "cluster": args.cluster, "latency": args.latency, "rate": args.rate,
            "ttft": args.ttft, "tpot": args.tpot, "attainment": args.attainment, "criterion": args.criterion,
            "goodput": best.goodput, "per_device_goodput": best.per_device_goodput, "devices": best.devices,
            "colocated_per_device_goodput": baseline.per_device if baseline else None,
        },
    }
    Path(args.out).write_text(json.dumps(plan, indent=2))
    print(f"\nwrote {args.out} (distserve serve --config {args.out})")
    if args.plot:
        _plot_plan(problem, best, args.plot)


def _plot_plan(problem, placement, path: str) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distserve.planner.simulator import ClusterSpec

    spec = ClusterSpec(
        [problem.instance("prefill", placement.prefill)] * placement.num_prefill
        + [problem.instance("decode", placement.decode)] * placement.num_decode,
        problem.transfer("node" if placement.algorithm == 2 else "network"),
    )
    rates = [placement.goodput * f for f in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)]
    attain = [problem.attainment(problem.run(spec, r)) for r in rates]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r / placement.devices for r in rates], [100 * a for a in attain], marker="o")
    ax.axhline(100 * problem.target, color="gray", linestyle="--")
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("simulated SLO attainment (%)")
    ax.set_title(f"prefill TP{placement.prefill.tp}PP{placement.prefill.pp} x{placement.num_prefill}, "
                 f"decode TP{placement.decode.tp}PP{placement.decode.pp} x{placement.num_decode}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulated attainment of a placement file's deployment at each rate."""
    import json
    from dataclasses import replace

    from distserve.bench.metrics import slo_attainment
    from distserve.config import DEFAULT_KV_CACHE_GB, DeploymentConfig
    from distserve.planner.hardware import model_shape
    from distserve.planner.latency_model import FittedLatencyModel
    from distserve.planner.search import Parallelism
    from distserve.planner.simulator import ClusterSpec, InstanceSpec, SpeedDrift, simulate
    from distserve.bench.arrivals import arrival_times

    if args.speed_drift < 0 or args.drift_window <= 0 or args.drift_samples < 1:
        raise ValueError("--speed-drift must be >= 0, --drift-window > 0 seconds and --drift-samples >= 1.")
    deployment = DeploymentConfig.load(args.config)
    requests, _ = _workload(args)
    lengths = [(r.prompt_len, r.output_len) for r in requests]
    shape = model_shape(args.plan_model or deployment.model)
    kv_bytes = shape.kv_bytes_per_token(args.dtype_bytes)
    instances = []
    for phase in deployment.phases():
        cfg = getattr(deployment, phase)
        # KV capacity: what the file sets; else, on the modelled devices, what fits beside the
        # weights (as the planner counts it); else this engine's CPU default budget
        capacity = (cfg.num_kv_blocks * deployment.block_size if cfg.num_kv_blocks
                    else int(cfg.kv_cache_gb * (1 << 30) // kv_bytes) if cfg.kv_cache_gb else None)
        if args.latency.startswith("fitted:"):
            files = dict(item.split("=", 1) for item in args.latency[len("fitted:"):].split(","))
            latency = FittedLatencyModel.load(files.get(phase, files.get("all")))
            capacity = capacity or int(DEFAULT_KV_CACHE_GB * (1 << 30) // kv_bytes)
        else:
            problem = _problem(argparse.Namespace(**{**vars(args), "plan_model": shape.name}), lengths)
            par = Parallelism(cfg.tensor_parallel_size, cfg.pipeline_parallel_size)
            latency = problem.latency_model(par)
            capacity = capacity or problem.kv_capacity(par)
        if args.latency_scale != 1.0:
            if not isinstance(latency, FittedLatencyModel):
                raise ValueError("--latency-scale needs a fitted or published latency model (--latency fitted:... or published).")
            latency = latency.scaled(args.latency_scale)
        for _ in range(cfg.num_instances):
            instances.append(InstanceSpec(phase, latency, capacity, cfg.max_num_seqs, cfg.max_num_batched_tokens or 2048,
                                          cfg.policy, deployment.mode == "chunked", deployment.block_size))
    spec = ClusterSpec(instances, lambda tokens: tokens * kv_bytes / args.transfer_bandwidth)
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


def add_plan_args(p: argparse.ArgumentParser, with_rate: bool) -> None:
    p.add_argument("--cluster", default="1x4xa100-80gb", help="NODESxDEVICES[xKIND]; kinds: a100-80gb, h100, h200, cpu")
    p.add_argument("--latency", default="analytical",
                   help="analytical | published (DistServe's A100 profiles) | fitted:PROFILE.json (from distserve profile)")
    p.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--criterion", choices=("joint", "separate"), default="joint",
                   help="joint: TTFT and TPOT met together; separate: each met by the share (DistServe's simulator)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    if with_rate:
        p.add_argument("--rate", type=float, required=True, help="request rate the placement must sustain (req/s)")


def register_planner(sub: argparse._SubParsersAction) -> None:
    profile = sub.add_parser("profile", help="fit a latency model to this engine's steps on this machine",
                             description="Time this engine's prefill and decode steps over a grid of batches and fit "
                             "prefill = a + b*sum(l) + c*sum(l^2), decode = a + b*sum(context) + c*B.")
    profile.add_argument("model", nargs="?", default=None)
    profile.add_argument("--threads", type=int, default=len(available_cores()), help="torch threads (cores of one instance)")
    profile.add_argument("--max-model-len", type=int, default=None)
    profile.add_argument("--quick", action="store_true", help="a small grid")
    profile.add_argument("--step-log", nargs="+", metavar="JSONL", default=None,
                         help="fit to the steps a server ran (files `serve --step-log` wrote) instead of timing a grid")
    profile.add_argument("--out", default="profile.json")
    profile.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="choose the goodput-optimal placement for a workload and SLOs",
                          description="Search prefill/decode parallelism and instance counts with the simulator "
                          "(Algorithm 1 and 2 of DistServe) and write a placement file for `distserve serve --config`.")
    plan.add_argument("--model", dest="plan_model", required=True, help="config.json folder or a known id (facebook/opt-66b, ...)")
    plan.add_argument("--serve-model", dest="model", default=None, help="model path written into the placement file")
    plan.add_argument("--algorithm", choices=("1", "2", "both"), default="both")
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
