"""Process settings made before jax starts its backend: glibc malloc on a CPU host, libtpu flags.

glibc malloc is tuned so XLA's per-step scratch is reused on a CPU host.

XLA:CPU allocates one large scratch buffer per executed program (~730 MiB for the dense CPU
benchmark step) and frees it at the end. With glibc's defaults a buffer that size is mmap'd and
unmapped every step, and the kernel faults in and zeroes its pages again each time: measured 374 ms
of system time and 186k page faults per 1.7 s dense step (benchmarks/RESULTS.md, "XLA:CPU vs torch
per op"). One arena, no mmap'd chunks and no trimming keep the freed memory for the next step:
the step then matches torch's (1.03-1.07x HF on one core). The cost: the process keeps its peak
heap instead of returning it to the OS. Call ``tune_host_malloc()`` before jax starts its threads
(their arenas are created on first use); experiment and benchmark entry points do.

libtpu flags: ``set_libtpu_flags(cfg)`` adds ``libtpu_flags(cfg)`` to ``LIBTPU_INIT_ARGS`` before
the TPU backend starts (experiments and ``python -m moejax.aot`` call it, so the AOT table shows the
program a pod run compiles). Dense FSDP on one slice: with its defaults the TPU compiler turns the
FSDP matmuls into windowed einsums (collective-permute loops adding each chunk's partial product into
the full output), ~120 GiB of accumulator traffic per MLP matmul per step on pretrain's v5p-64
preset, HBM-bound at a 36% MFU bound; with windowed einsum off it all-gathers the weights and the
same step is compute-bound at 75% (benchmarks/RESULTS.md, the AOT table).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV = "MOEJAX_HOST_MALLOC"  # "keep" (tune), "default" (leave glibc alone), unset = auto
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters
_applied = False


def _has_accelerator() -> bool:
    """A GPU or TPU is attached (then the host heap is not the hot path and we leave it alone)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
                or glob.glob("/dev/vfio/[0-9]*"))


def tune_host_malloc() -> bool:
    """Apply the malloc settings above once (``MOEJAX_HOST_MALLOC=keep`` forces them,
    ``=default`` skips them; by default they apply on hosts without an accelerator). Returns
    whether they are in force. A libc without ``mallopt`` (not glibc) is left alone."""
    global _applied
    if _applied:
        return True
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("auto", "keep", "default"):
        raise ValueError(f"{ENV}={mode!r}: use 'keep', 'default' or leave it unset")
    if mode == "default" or (mode == "auto" and _has_accelerator()):
        return False
    _applied = _mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (made from now on): ``moejax.data.prepare``'s command, whose
    tensorstore writer threads each kept an arena of freed buffers (peak memory grew with the
    corpus; capped at 2, flat). Returns whether the cap is in force (False off glibc)."""
    return _mallopt((M_ARENA_MAX, arenas))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc ``mallopt(param, value)`` for each pair; False when libc has no mallopt or refuses."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in settings)


def set_compilation_cache(enabled: bool) -> None:
    """Switch jax's persistent compilation cache on or off for the programs compiled next. jax
    decides once per process whether to use the cache, so the switch alone does nothing after
    the first compile: the decision is reset with it (the cache reopens in the same directory)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def compile_without_cache() -> None:
    """Compile every program this process builds from now on instead of loading it from jax's
    persistent compilation cache (the timing benchmarks' command lines). XLA:CPU compiles for the
    intra-op thread count it finds (an elementwise loop is split into one partition per thread),
    and the cache key leaves that count out: a program cached by a one-core run is loaded,
    unsplit, by a two-thread run (measured: the MoE layer's fwd+bwd 153 ms loaded vs 120 ms
    compiled on two threads). Works before or after jax is imported or has compiled."""
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # read when jax is first imported
    if "jax" in sys.modules:
        set_compilation_cache(False)


LIBTPU_ENV = "LIBTPU_INIT_ARGS"
DENSE_FSDP_FLAGS = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false",
                    "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


def libtpu_flags(cfg) -> tuple[str, ...]:
    """The libtpu flags a run of ``cfg`` (a moejax Config) compiles with: windowed einsum off for a
    dense model sharded over ``mesh.fsdp`` (see the module docstring); none otherwise."""
    fsdp = cfg.mesh.fsdp
    if not cfg.model.moe.enabled and (fsdp > 1 or fsdp == -1):
        return DENSE_FSDP_FLAGS
    return ()


def set_libtpu_flags(cfg) -> list[str]:
    """Append ``libtpu_flags(cfg)`` to ``$LIBTPU_INIT_ARGS``, except flags the user already set by
    name (theirs win). Call before the TPU backend starts (libtpu reads the variable once); returns
    the flags added."""
    current = os.environ.get(LIBTPU_ENV, "").split()
    named = {f.split("=", 1)[0] for f in current}
    added = [f for f in libtpu_flags(cfg) if f.split("=", 1)[0] not in named]
    if added:
        os.environ[LIBTPU_ENV] = " ".join(current + added)
    return added
