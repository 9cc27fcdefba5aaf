"""The `distserve` command line: serve (the OpenAI-compatible server), and the offline tools."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable

from distserve.config import DEFAULT_MODE, KV_TRANSPORTS, QUANTIZATIONS, DeploymentConfig, Mode, PhaseConfig, Policy, Role

PHASES = (Role.PREFILL, Role.DECODE)
POLICIES = [p.value for p in Policy]

def core_list(text: str) -> list[int]:
    """CPU cores as `taskset -c` writes them: 0-3,8,10-11."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cores += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cores must look like 0-3,8 (got {text!r})") from None
    if not cores:
        raise argparse.ArgumentTypeError(f"no cores in {text!r}")
    return cores


# flag -> (PhaseConfig field, type, help)
PHASE_FLAGS: dict[str, tuple[str, Callable[[str], object], str, str]] = {
    "tensor-parallel-size": ("tensor_parallel_size", int, "N", "tensor-parallel workers per instance"),
    "pipeline-parallel-size": ("pipeline_parallel_size", int, "N", "pipeline stages per instance"),
    "max-num-seqs": ("max_num_seqs", int, "N", "most requests in one step (the batch size)"),
    "max-num-batched-tokens": ("max_num_batched_tokens", int, "N", "most tokens in one step"),
    "policy": ("policy", str, "POLICY", f"scheduling policy, one of {POLICIES} (sjf: shortest prompt first, prefill only)"),
    "kv-cache-gb": ("kv_cache_gb", float, "GIB", "KV cache budget per instance, GiB (default on CPU: 4, 1 for prefill, "
                    "or what max-num-seqs sequences of max-model-len tokens can fill if less; 85%% of free memory on a GPU)"),
    "num-kv-blocks": ("num_kv_blocks", int, "N", "KV cache blocks per instance (overrides the budget)"),
    "num-threads": ("num_threads", int, "N", "torch threads per worker"),
    "cpu-cores": ("cpu_cores", core_list, "LIST", "CPU cores each instance runs on, e.g. 0-3,8 (default: the "
                  "machine's cores split evenly over the instances; instances given the same cores share them)"),
    "nice": ("nice", int, "N", "niceness of each instance's processes, 0-19 (default 0): against other processes "
             "on its cores (phases on the same cores already take turns, see --time-share-cores)"),
}


def add_deployment_args(parser: argparse.ArgumentParser) -> None:
    """Flags that describe a deployment; all default to None so a --config file is only
    overridden by what is given."""
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face folder, .gguf file or hub id (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--config", help="placement file (JSON) as `distserve plan` writes it; flags override it")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=None,
                        help=f"disaggregated: prefill and decode instances; colocated: continuous batching; "
                        f"chunked: chunked prefill (default {DEFAULT_MODE})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--dtype", default=None, help="auto (float32 on CPU), float32, float16 or bfloat16")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV cache block (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="seed of unseeded sampling")
    parser.add_argument("--swap-space", type=float, default=None, dest="swap_space_gb", metavar="GIB", help="swap space per instance, GiB")
    parser.add_argument("--backend", choices=("local", "ray"), default=None, help="where instances run")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (--backend ray)")
    parser.add_argument("--kv-transport", choices=KV_TRANSPORTS, default=None,
                        help="how decode instances pull KV: auto (shared memory on one machine, torch.distributed "
                        "across machines), shm, or torch")
    parser.add_argument("--pair-placement", action="store_true", default=None,
                        help="Ray: place prefill instance i and decode instance i on one node")
    parser.add_argument("--max-restarts", type=int, default=None, metavar="N",
                        help="times a dead instance is started again within --restart-window (default 3; 0: never)")
    parser.add_argument("--restart-window", type=float, default=None, metavar="S", help="seconds of the restart budget (default 600)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV cache of prompt prefixes seen before (default: on)")
    parser.add_argument("--routing-policy", choices=("cache-aware", "least-loaded"), default=None,
                        help="how requests are spread over instances (default cache-aware)")
    parser.add_argument("--conditional-prefill-tokens", type=int, default=None, metavar="N",
                        help="disaggregated: prefill on the decode instance a prompt it caches all but N tokens of "
                        "(default 128; 0: never)")
    parser.add_argument("--time-share-cores", action=argparse.BooleanOptionalAction, default=None,
                        help="disaggregated: prefill and decode instances on the same CPU cores run their steps one "
                        "at a time, a waiting prefill step first (default: where their cores overlap)")
    parser.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                        help="weights: auto (a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K matrices kept quantized on CPU), "
                        "none (all float), int8 (per channel) or int4 (groups of 32), quantized at load (default auto)")
    parser.add_argument("--step-log", default=None, metavar="DIR",
                        help="write every engine step (start, seconds, prompt chunks, decode contexts) to DIR/<instance>.jsonl")
    group = parser.add_argument_group("colocated and chunked modes")
    group.add_argument("--num-instances", type=int, default=None, metavar="N", help="colocated instances (data parallel)")
    for flag, (field, kind, metavar, text) in PHASE_FLAGS.items():
        group.add_argument(f"--{flag}", type=kind, default=None, dest=f"colocated_{field}", metavar=metavar, help=text)
    for phase in PHASES:
        group = parser.add_argument_group(f"{phase} instances (disaggregated mode)")
        group.add_argument(f"--num-{phase}-instances", type=int, default=None, dest=f"{phase}_num_instances", metavar="N")
        for flag, (field, kind, metavar, text) in PHASE_FLAGS.items():
            group.add_argument(f"--{phase}-{flag}", type=kind, default=None, dest=f"{phase}_{field}", metavar=metavar, help=text)
        group.add_argument(f"--{phase}-quantization", choices=QUANTIZATIONS, default=None, dest=f"{phase}_quantization",
                           help=f"weights of the {phase} instances (default: --quantization)")


def deployment_from_args(args: argparse.Namespace) -> DeploymentConfig:
    config = DeploymentConfig.load(args.config) if args.config else DeploymentConfig()
    if args.model is not None:
        config.model = args.model
    for field in ("mode", "tokenizer", "dtype", "device", "max_model_len", "block_size", "seed", "swap_space_gb", "backend", "ray_address",
                  "kv_transport", "pair_placement", "step_log", "max_restarts", "restart_window", "enable_prefix_caching",
                  "routing_policy", "conditional_prefill_tokens", "quantization", "time_share_cores"):
        value = getattr(args, field)
        if value is not None:
            setattr(config, field, value)
    if args.num_instances is not None:
        config.colocated.num_instances = args.num_instances
    for phase in Role:
        overrides = {}
        for f in dataclasses.fields(PhaseConfig):
            value = getattr(args, f"{phase}_{f.name}", None)
            if value is not None:
                overrides[f.name] = value
        setattr(config, phase.value, dataclasses.replace(config.phase(phase), **overrides))
    config.validate()
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    from distserve.entrypoints.api_server import ServerSettings, run_server
    from distserve.entrypoints.async_llm import AsyncLLM

    # SIGTERM ends the process like Ctrl-C does, through the finally below (while the model
    # loads; serving, the server drains first, then re-raises the signal)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for name in ("max_queue_len", "max_request_bytes", "shutdown_timeout", "request_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    deployment = deployment_from_args(args)
    engine = AsyncLLM(config=deployment, max_queue_len=args.max_queue_len,
                      trust_request_chat_template=args.trust_request_chat_template)
    names = args.served_model_name or [engine.model_config.name]
    settings = ServerSettings(api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                              shutdown_timeout=args.shutdown_timeout, request_timeout=args.request_timeout)
    try:
        run_server(engine, names, settings, args.host, args.port, args.uvicorn_log_level)
    finally:
        engine.shutdown()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distserve",
        description="LLM serving with prefill and decoding disaggregated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `distserve COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        f"/v1/models, /health, /metrics, /generate). Mode {DEFAULT_MODE} unless --mode says otherwise.",
    )
    add_deployment_args(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and /generate")
    group.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use (default: the model's)")
    group.add_argument("--uvicorn-log-level", default="warning")
    group.add_argument("--max-queue-len", type=int, default=4096, metavar="N",
                       help="requests that may wait per instance; past it new requests get 503 with Retry-After (default 4096)")
    group.add_argument("--max-request-bytes", type=int, default=8 << 20, metavar="BYTES",
                       help="largest request body; a larger one gets 413 (default 8 MiB)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM / SIGINT, seconds running requests may take to finish before their streams are "
                       "ended with an error (default 30)")
    group.add_argument("--request-timeout", type=float, default=None, metavar="S",
                       help="seconds a request may run before it is aborted with an error (default: no limit)")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="render a chat template a request brings (chat_template_kwargs.chat_template); refused otherwise")
    serve.set_defaults(func=cmd_serve)
    from distserve.entrypoints import cli_bench, cli_planner

    cli_bench.register(sub)
    cli_planner.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"distserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
