"""Ask the built-in model a question through the offline API, disaggregated (1 prefill +
1 decode instance), and show each request's timeline."""

from __future__ import annotations

from distserve import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
]


def main() -> None:
    with LLM(mode="disaggregated", num_prefill_instances=1, num_decode_instances=1) as llm:
        conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
        outputs = llm.chat(conversations, SamplingParams(max_tokens=64, temperature=0))
        for question, out in zip(QUESTIONS, outputs):
            m = out.metrics
            print(f"\nQ: {question}\nA: {out.outputs[0].text.strip()}")
            print(
                f"   TTFT {m.ttft * 1000:.0f} ms | KV migration {m.transfer_seconds * 1000:.2f} ms "
                f"({m.transfer_bytes / 1e6:.1f} MB) | TPOT {m.tpot * 1000:.1f} ms | "
                f"{m.num_generated_tokens} tokens"
            )


if __name__ == "__main__":
    main()
