"""The floating-point type models compute in on this machine, and what describes the machine in a record.

bf16 halves memory and is the faster type where the hardware computes it: CUDA GPUs that support it, CPUs with
AVX512-BF16 or AMX units. Elsewhere a CPU emulates it: a bf16 matmul measured ~127x slower than fp32 on a 2-core
AVX2 machine, and vLLM's CPU build generated 4.2x faster in fp32 there. So generation and training run in bf16 only
where it is native (fp16 on CUDA GPUs without bf16), and an experiment can name its own (`backend.options.dtype`,
`train.bf16`).
"""
from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU that supports it, or a CPU with avx512_bf16 / AMX."""
    cuda = _cuda()
    if cuda is not None:
        return cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def machine_dtype() -> str:
    """The dtype generation runs in here by default: bfloat16 where native, else float16 on a GPU, float32 on a CPU."""
    if native_bf16():
        return "bfloat16"
    return "float16" if _cuda() is not None else "float32"


def machine() -> dict:
    """What a measurement or a cached result made here should name: CPU, cores, vector units, bf16, GPU."""
    import torch

    flags = cpu_flags()
    cuda = _cuda()
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "isa": torch.backends.cpu.get_cpu_capability(),
        "avx512": "avx512f" in flags, "bf16_native": native_bf16(),
        "gpu": cuda.get_device_name(0) if cuda is not None else None,
    }


def machine_line() -> str:
    """`machine()` in one line, for benchmark output."""
    m = machine()
    flags = cpu_flags()
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    return (f"{m['cpu']}, {m['cores']} cores, torch CPU capability {m['isa']}, flags {' '.join(units) or 'none'}"
            f" ({'bf16 native' if m['bf16_native'] else 'bf16 emulated'}){gpu}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
