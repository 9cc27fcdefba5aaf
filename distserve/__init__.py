"""distserve: LLM serving with prefill and decoding disaggregated.

    from distserve import LLM, SamplingParams
    llm = LLM(mode="disaggregated", num_prefill_instances=1, num_decode_instances=1)
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].outputs[0].text)
"""

from distserve.config import DeploymentConfig, Mode, PhaseConfig
from distserve.engine.errors import EngineDeadError
from distserve.entrypoints.async_llm import AsyncLLM
from distserve.entrypoints.llm import LLM
from distserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from distserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncLLM",
    "CompletionOutput",
    "DeploymentConfig",
    "EngineDeadError",
    "LLM",
    "Mode",
    "PhaseConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
