"""Native CPU kernels, compiled for this machine on first use and cached.

`cpu_ops()` returns the compiled module, or None where it cannot be built (no compiler),
in which case callers use their torch implementation. `DISTSERVE_NATIVE_KERNELS=0` turns
them off.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    "gelu_tanh_",
    "linear_small_batch",
    "rotary_embedding",
    "reshape_and_cache",
    "llama_decode_layer",
    "layer_norm_decode_layer",
    "argmax_rows",
    "prefill_attention",
    "quant_linear",
    "dequantize_rows",
    "pack_panels",
    "panel_linear",
    "screened_argmax",
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
        with _build_lock(build):
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


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """One process at a time builds or loads the kernels of a folder. torch's own lock there
    is a file that a builder killed mid-build (an instance stopped with SIGKILL on its first
    step) leaves behind, and every later build would wait on it forever; this one is an
    `flock`, released with the dead process's descriptors, so whoever holds it knows torch's
    file is stale and removes it."""
    with open(build / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        yield


def native_ops(x: torch.Tensor) -> ModuleType | None:
    """The kernels, when they apply to `x` (float32 on CPU) and could be built."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return cpu_ops()
