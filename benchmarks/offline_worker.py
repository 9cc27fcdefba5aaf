"""One engine kept loaded in its own process, running the workloads it is sent, so that a
benchmark can interleave systems round by round (this machine's speed drifts by 10-20% over
minutes: only runs close in time compare).

Run with the interpreter of the engine's own environment; it imports nothing of distserve
unless asked to run distserve:

    python benchmarks/offline_worker.py {distserve[:QUANTIZATION]|vllm|transformers|llama.cpp} MODEL MAX_MODEL_LEN

(`distserve:none` loads a GGUF dequantized, `distserve:int4` quantizes at load; llama.cpp, from
llama-cpp-python, takes a GGUF and runs the prompts one after another, its only mode.)

Protocol, one JSON object a line: after loading it prints {"ready": true}; then for each
line {"prompts": [[ids]], "max_tokens": [n]} read from stdin it generates greedily (EOS
ignored) and prints {"seconds": s, "output_tokens": n, "tokens": [[ids]]}. EOF ends it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def reply(obj: dict) -> None:
    sys.stdout.write("\n" + json.dumps(obj) + "\n")  # on its own line, whatever the engine printed
    sys.stdout.flush()


def vllm_style(system: str, model: str, max_model_len: int):  # noqa: ANN201 - an engine of either package
    """A generate(prompts, max_tokens) for an engine with vLLM's offline API."""
    if system == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, dtype="float32", seed=0, max_model_len=max_model_len, max_num_seqs=256,
                  enable_prefix_caching=False)
    else:
        from distserve import LLM, SamplingParams

        quantization = system.partition(":")[2] or "auto"
        llm = LLM(model, mode="colocated", max_model_len=max_model_len, enable_prefix_caching=False,
                  quantization=quantization)

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def transformers_generate(model: str):  # noqa: ANN201
    """Hugging Face `generate`, left-padded batches of up to 64 prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        out_tokens: list[list[int]] = []
        for i in range(0, len(prompts), 64):
            batch, lengths = prompts[i : i + 64], max_tokens[i : i + 64]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            with torch.inference_mode():  # the batch runs to its longest output; each keeps its own
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths),
                                  min_new_tokens=max(lengths), do_sample=False, pad_token_id=0)
            out_tokens += [out[row, width : width + n].tolist() for row, n in enumerate(lengths)]
        return out_tokens

    return generate


def llama_cpp_generate(model: str, max_model_len: int):  # noqa: ANN201
    """llama.cpp (llama-cpp-python) on the GGUF file, greedy, one prompt after another."""
    from llama_cpp import Llama

    threads = len(os.sched_getaffinity(0))
    llm = Llama(model_path=model, n_ctx=max_model_len, n_threads=threads, n_threads_batch=threads, n_batch=512,
                seed=0, verbose=False)

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        out_tokens = []
        for prompt, n in zip(prompts, max_tokens):
            tokens: list[int] = []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                tokens.append(token)
                if len(tokens) == n:
                    break
            out_tokens.append(tokens)
        return out_tokens

    return generate


def main() -> None:
    system, model, max_model_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if system == "transformers":
        generate = transformers_generate(model)
    elif system == "llama.cpp":
        generate = llama_cpp_generate(model, max_model_len)
    else:
        generate = vllm_style(system, model, max_model_len)
    generate([[100 + i for i in range(16)]] * 2, [4, 4])  # warm up
    reply({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        tokens = generate(job["prompts"], job["max_tokens"])
        seconds = time.perf_counter() - start
        reply({"seconds": seconds, "output_tokens": sum(map(len, tokens)), "tokens": tokens})


if __name__ == "__main__":
    main()
