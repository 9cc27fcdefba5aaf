"""Native CPU kernels, compiled for this machine on first use and cached.

`cpu_ops()` returns the compiled module, or None where it cannot be built (no compiler),
in which case callers use their torch implementation. `DISTSERVE_NATIVE_KERNELS=0` turns
them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
# compiled as one unit, in this order (later files use helpers of earlier ones)
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "quant_linear.cpp", "panel_linear.cpp", "decode_attention.cpp",
                                                            "prefill_attention.cpp")]
FUNCTIONS = [
    "paged_attention_decode",
    "rms_norm",
    "silu_and_mul",
    "linear_small_batch",
    "rotary_embedding",
    "reshape_and_cache",
    "llama_decode_layer",
    "opt_decode_layer",
    "argmax_rows",
    "prefill_attention",
    "quant_linear",
    "dequantize_rows",
    "pack_panels",
    "panel_linear",
]


@lru_cache(maxsize=1)
def cpu_ops() -> ModuleType | None:
    if os.environ.get("DISTSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load_inline

    from distserve.weights.gguf import cache_root

    source = "\n".join(path.read_text() for path in SOURCES)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    build = cache_root() / "kernels" / digest
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load_inline(
            name=f"distserve_cpu_ops_{digest}",
            cpp_sources=[source],
            functions=FUNCTIONS,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja: run on torch ops, slower
        logger.warning("native CPU kernels unavailable (%s); using torch ops", exc)
        return None


def native_ops(x: torch.Tensor) -> ModuleType | None:
    """The kernels, when they apply to `x` (float32 on CPU) and could be built."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return cpu_ops()
