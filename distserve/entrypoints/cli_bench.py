"""`distserve bench`: SLO attainment and goodput of OpenAI-compatible servers (`run` against a
running server, `compare` starting each system in turn), and the workload and arrival flags
the planner's commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from distserve.config import Mode, available_cores


def workload_tokenizer(args: argparse.Namespace):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    from distserve.tokenizer import load_tokenizer
    from distserve.weights.source import load_model_config

    # the planner builds lengths with the built-in tokenizer unless told otherwise: the model
    # it plans for may be a shape only (a hub id with no network here)
    model = args.tokenizer_model if hasattr(args, "tokenizer_model") else args.model
    return load_tokenizer(load_model_config(model))


def load_workload_from_args(args: argparse.Namespace, chat: bool = False):  # noqa: ANN202 - (requests, description)
    """The workload's requests, or with `chat` and a chat workload its conversations."""
    from distserve.bench.workloads import WorkloadSpec, load_conversations, load_workload

    spec = WorkloadSpec.parse(
        args.workload,
        num_requests=args.num_requests,
        max_model_len=args.max_model_len,
        max_prompt_len=args.max_prompt_len,
        output_len=args.output_len,
        seed=args.seed,
        max_turns=getattr(args, "max_turns", 4),
    )
    if spec.is_chat and not chat:
        raise ValueError(f"{spec.name} is replayed turn by turn by `distserve bench`; the planner simulates independent "
                         "requests (use sharegpt, sharegpt-multiturn or synthetic).")
    if spec.is_chat:
        conversations = load_conversations(spec, workload_tokenizer(args))
        if not conversations:
            raise ValueError(f"workload {args.workload} gave no conversations after filtering.")
        turns = [t for c in conversations for t in c.turns]
        described = {"name": args.workload, "conversations": len(conversations), "requests": len(turns),
                     "system_prompt_len": len(conversations[0].system_token_ids), "think_time": args.think_time,
                     "mean_user_len": sum(len(u) for u, _ in turns) / len(turns), "mean_output_len": sum(n for _, n in turns) / len(turns)}
        print(f"workload {args.workload}: {len(conversations)} conversations, {len(turns)} turns, mean user message "
              f"{described['mean_user_len']:.0f} tokens, mean answer {described['mean_output_len']:.0f} tokens")
        return conversations, described
    requests = load_workload(spec, workload_tokenizer(args))
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
                         seed=args.seed, target=args.target, search_iterations=args.search, think_time=args.think_time,
                         tokenizer=workload_tokenizer(args))


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
    requests, described = load_workload_from_args(args, chat=True)
    model = args.served_model
    ttft, tpot = _slos(args, args.base_url, model, requests, args.api_key)
    settings = _settings(args, ttft, tpot)
    system = benchmark_system(args.base_url, model, requests, settings, args.name, args.devices, args.api_key)
    _finish([system], settings, described, args, {"base_url": args.base_url})


def cmd_bench_compare(args: argparse.Namespace) -> None:
    from distserve.bench.runner import Server, benchmark_system, distserve_command, free_port

    _quick(args)
    requests, described = load_workload_from_args(args, chat=True)
    systems_spec: list[tuple[str, list[str] | None, str]] = []
    for item in args.systems:
        name, _, extra = item.partition("=")
        mode_args = f"--mode {name}" if name in {m.value for m in Mode} and not extra else extra
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
                   "(SPEC: fixed:IN:OUT, uniform:IN_LO:IN_HI:OUT_LO:OUT_HI, lognormal:IN_MEAN:OUT_MEAN); chats replayed turn by turn "
                   "(bench only): sharegpt-chat[:PATH] | synthetic-chat:SYSTEM:TURNS:USER:ANSWER")
    g.add_argument("--num-requests", type=int, default=100, help="requests (chat workloads: conversations)")
    g.add_argument("--max-turns", type=int, default=4, help="sharegpt-chat: exchanges replayed per conversation")
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
    g.add_argument("--think-time", type=float, default=0.0, metavar="S",
                   help="chat workloads: seconds between an answer and the next turn (rates count new conversations)")


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
    compare.add_argument("--systems", nargs="*", default=[m.value for m in Mode],
                         help="distserve systems: disaggregated | colocated | chunked | NAME='SERVE FLAGS' "
                         "(none: only the --vllm-command system)")
    compare.add_argument("--server-args", default="", help="flags added to every distserve serve command")
    compare.add_argument("--vllm-command", default=None,
                         help="a command line that serves the same model on port {port} (run with bash)")
    add_bench_args(compare)
    compare.set_defaults(func=cmd_bench_compare)
