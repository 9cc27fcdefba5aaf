"""The LM head of greedy steps: the float32 head and argmax against the bfloat16 screen with
its exact recompute (`ParallelLMHead.greedy_tokens`), on each shape's own head, and how many
tokens the screen leaves to recompute.

Hidden states are transformers' last ones (the LM head's input) for prompts of random tokens
(for every shape) and, for SmolLM2 (a trained model), for chat questions answered greedily,
48 tokens each. For each row count the two paths alternate (medians of 9); the tokens of the
two are compared on every row. Needs a CPU with bfloat16 matmuls (AMX or AVX512-BF16).

    python -m benchmarks.screened_head [--shapes opt-200m llama-gqa-150m smollm2] [--rows 1 16 64 128]

Prints a table and writes benchmarks/results/screened_head.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.offline_throughput import WORK_DIR, shape_folder
from benchmarks.report import report
from distserve.engine.model_runner import load_model
from distserve.layers.embedding import SCREEN_CANDIDATES, bf16_matmul_fast, screen_error
from distserve.layers.sampler import greedy
from distserve.weights.source import load_model_config

RESULTS = Path("benchmarks/results")
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain how a transistor works.",
             "List three uses of Python.", "Who wrote Hamlet and when?", "Translate 'good morning' into German.",
             "Summarize the plot of Cinderella.", "What is 17 times 23?"]


@torch.inference_mode()
def hidden_states(folder: Path, chat: bool) -> torch.Tensor:
    """transformers' inputs to the LM head: every position of 8 random prompts of 64 tokens,
    or the last position of each step of greedy answers to chat questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0][:, -1] if chat else i[0][0]))
    if chat:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for question in QUESTIONS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            model.generate(ids, max_new_tokens=48, do_sample=False)
    else:
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            model(torch.randint(100, min(model.config.vocab_size, 40000), (1, 64), generator=g))
    return torch.cat(seen).contiguous()


def candidates(head, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - a ParallelLMHead
    """How many tokens of each row the screen leaves to recompute: `screened_argmax`'s rule
    (upper bound reaching the largest lower bound), counted in double, which the kernel does
    not report."""
    s = head.screened_logits(x).double()
    err = screen_error(x.shape[1]) * x.double().norm(dim=1, keepdim=True) * head.row_norms.double()
    lower = (s - err).amax(dim=1, keepdim=True)
    return (s + err >= lower).sum(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["opt-200m", "llama-gqa-150m", "smollm2"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 128])
    parser.add_argument("--out", default=str(RESULTS / "screened_head.json"))
    args = parser.parse_args()
    if not bf16_matmul_fast():
        raise SystemExit("this CPU has no bfloat16 matmuls (AMX or AVX512-BF16): the screen is never built here")
    torch.set_num_threads(2)
    rows = []
    for shape in tqdm(args.shapes, desc="shapes"):
        folder = shape_folder(shape, WORK_DIR)
        head = load_model(load_model_config(str(folder), max_model_len=2048), torch.device("cpu")).lm_head
        for source in ["random prompts"] + (["chat answers"] if shape == "smollm2" else []):
            x = hidden_states(folder, chat=source == "chat answers")
            counts = candidates(head, x).float()
            for m in args.rows:
                xs = x[torch.arange(m) % len(x)].contiguous()
                paths = {"float32": lambda xs=xs, head=head: greedy(head.compute_logits(xs)),
                         "screened": lambda xs=xs, head=head: head.greedy_tokens(xs)}
                times: dict[str, list[float]] = {name: [] for name in paths}
                tokens = {name: run() for name, run in paths.items()}
                for _ in range(9):
                    for name, run in paths.items():
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
                ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
                rows.append({"shape": shape, "hidden states": source, "rows": m, "float32 ms": ms["float32"],
                             "screened ms": ms["screened"], "speedup": ms["float32"] / ms["screened"],
                             "same tokens": float((tokens["float32"] == tokens["screened"]).float().mean()),
                             "candidates median": float(counts.median()), "candidates p90": float(counts.quantile(0.9)),
                             "candidates max": int(counts.max()),
                             f"rows over {SCREEN_CANDIDATES}": float((counts > SCREEN_CANDIDATES).float().mean())})
    report(rows, [("shape", "shape", "s"), ("hidden states", "hidden states", "s"), ("rows", "rows", "d"),
                  ("float32 ms", "float32 ms", ".2f"), ("screened ms", "screened ms", ".2f"), ("x", "speedup", ".2f"),
                  ("same tokens", "same tokens", ".0%"), ("cand. median", "candidates median", ".0f"),
                  ("p90", "candidates p90", ".0f"), ("max", "candidates max", "d"),
                  (f"> {SCREEN_CANDIDATES}", f"rows over {SCREEN_CANDIDATES}", ".0%")], args.out)


if __name__ == "__main__":
    main()
