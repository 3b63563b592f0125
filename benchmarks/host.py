"""What a CPU benchmark ran on: the model name and the SIMD extensions its matmuls can use.

Two hosts with the same model name ("AMD EPYC" on these VMs) can differ by AVX-512, which halves
or doubles XLA's and torch's matmul rates alike but not always their ratio; the step and
rollout results record this next to their numbers."""

from __future__ import annotations

import platform

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_description() -> dict:
    """{'model': name, 'simd': [flags present, of SIMD_FLAGS]} from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "simd": [f for f in SIMD_FLAGS if f in flags]}
