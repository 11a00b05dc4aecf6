"""Native CPU kernels, compiled on first use with `torch.utils.cpp_extension` and cached on disk.

`cpu_decode_attention` reads a low-precision, sequence-major KV cache in place and streams it once (each
thread owns a contiguous range of (sequence, head) rows and walks the positions in order), which the
pure-torch path cannot do without copying the cache into a batched-matmul layout and converting it to
fp32 first. The build needs a C++ compiler and `ninja`; it is compiled with `-march=native` (the cache key
includes the CPU's flags) and links PyTorch's own OpenMP runtime, so it shares PyTorch's thread pool.
When the build is impossible, or `FLEXGEN_NATIVE_KERNELS=0`, callers fall back to the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("decode_attention.cpp")


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}|{torch.__version__}".encode()).hexdigest()[:10]


@functools.cache
def native_module() -> ModuleType | None:
    """The compiled extension, or None (disabled, or no compiler): built once per process and machine."""
    if os.environ.get("FLEXGEN_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        source = SOURCE.read_text()
        digest = hashlib.sha256(source.encode()).hexdigest()[:10]
        lib = Path(torch.__file__).parent / "lib"
        omp = [f"-L{lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{lib}"] if (lib / "libgomp.so.1").exists() else []
        return load_inline(f"flexgen_cpu_{digest}_{_cpu_signature()}", cpp_sources=[source],
                           functions=["decode_attention"],
                           extra_cflags=["-O3", "-march=native", "-ffast-math"] + (["-fopenmp"] if omp else []),
                           extra_ldflags=omp, verbose=False)
    except Exception as exc:  # no compiler, no ninja, unsupported platform: use the torch path
        log.warning("native CPU kernels unavailable (%s: %s); using the slower torch path for CPU attention",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """Native decode attention, or None when the kernel cannot take these inputs (caller falls back).

    q: (b, nh, d); k, v: (t, b, nh, d) on the CPU, each position contiguous; valid: (b, t). Returns (b, nh, d)
    in q's dtype.
    """
    mod = native_module()
    if mod is None or k.device.type != "cpu" or k.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    b, nh, d = k.shape[1:]
    if k.stride() != (b * nh * d, nh * d, d, 1) or v.stride() != k.stride():
        return None
    return mod.decode_attention(q, k, v, valid, d ** -0.5).to(q.dtype)
