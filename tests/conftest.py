"""Test setup: CPU only, 8 emulated devices; set before jax is imported anywhere.

``gpu``-marked tests run their checks in a fresh interpreter with the caller's own environment (this
process is pinned to CPU), and are skipped, with the reason printed by ``-ra``, where jax has no
GPU backend. ``-m gpu`` selects only them; ``-m "not gpu"`` leaves them out.

Programs compile with little optimization (jax's ``jax_disable_most_optimizations``: XLA backend
level 0), except in tests marked ``optimized``: see ``COMPILE_EFFORT_ENV`` below.
"""

import gc
import importlib.metadata
import os
import subprocess
import sys

CALLER_ENV = dict(os.environ)  # before the CPU pinning below: what a GPU check subprocess sees

os.environ["JAX_PLATFORMS"] = "cpu"

# Compile effort. The suite compiles ~7,500 XLA programs (2026-12-02) and runs most of them a few
# times, so compiling is most of its time on 2 cores. With jax_disable_most_optimizations (XLA's backend at
# optimization level 0, LLVM's expensive passes off) a tiny MoE train step compiled ~2x faster (18 vs
# 33 s on a loaded host) and ran ~2x slower (108 vs 48 ms), side by side in one process (2026-12-02);
# the HLO program is the same. Tests that judge a TPU program (memory, FLOPs, kernels) are marked
# ``optimized`` and compile as users' programs do (so should a test whose time is running rather
# than compiling). Set before jax is imported, so subprocesses that tests start inherit it; a
# caller's own setting wins.
COMPILE_EFFORT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ.setdefault(COMPILE_EFFORT_ENV, "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# No moejax.runtime.tune_host_malloc here (the entry points apply it for long training loops;
# tests/test_runtime.py checks it in a subprocess): a test process compiles ~1,000 programs, and
# with one arena, no mmap chunks and no trimming its heap never shrank (7.5 GB RSS by the RL tests).

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if "jax_disable_most_optimizations" in jax.config.values:  # also where jax was imported first
    jax.config.update("jax_disable_most_optimizations",
                      os.environ[COMPILE_EFFORT_ENV].lower() in ("1", "true", "yes", "on", "y", "t"))
assert jax.device_count() == 8, "conftest must run before anything imports jax"

import pytest  # noqa: E402

GPU_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")


def no_gpu_reason() -> str | None:
    """Why jax has no GPU backend in the caller's environment (None: it has one). A plugin check
    first (free), then a fresh interpreter asks jax, since this process is pinned to CPU."""
    plugins = [d.metadata["Name"] for d in importlib.metadata.distributions()
               if (d.metadata["Name"] or "").lower().startswith(GPU_PLUGIN_PREFIXES)]
    if not plugins:
        return "needs a GPU: no jax GPU plugin is installed (e.g. pip install 'jax[cuda13]')"
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           env=CALLER_ENV, capture_output=True, text=True, timeout=300)
    backend = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "none"
    if probe.returncode or backend != "gpu":
        return f"needs a GPU: jax's default backend here is {backend!r} (plugins: {plugins})"
    return None


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: probe only when a gpu test is selected
def pytest_collection_modifyitems(config, items):
    """Skip the selected ``gpu`` tests, naming why, when jax has no GPU backend."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = no_gpu_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """An ``optimized`` test (its setup, module fixtures included, and any subprocess it starts)
    compiles at full effort; every other test at the suite's default (see COMPILE_EFFORT_ENV).
    Mark whole modules where a module fixture serves several tests."""
    if item.get_closest_marker("optimized") is None or \
            "jax_disable_most_optimizations" not in jax.config.values:
        yield
        return
    before = os.environ[COMPILE_EFFORT_ENV], jax.config.values["jax_disable_most_optimizations"]
    os.environ[COMPILE_EFFORT_ENV] = "0"
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        os.environ[COMPILE_EFFORT_ENV] = before[0]
        jax.config.update("jax_disable_most_optimizations", before[1])


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One corpus/token cache for the whole session (built on first use by moejax.data)."""
    return str(tmp_path_factory.mktemp("moejax-cache"))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop jax's compiled-program caches after each test module. Every live XLA:CPU executable
    holds ~7 memory maps; kept alive, they reached 58-64k maps by test ~1,000 (measured), near
    the kernel's vm.max_map_count of 65,530, where two runs had died with SIGSEGV while XLA
    serialized an executable (a failed mmap). Later modules recompile, or hit the persistent
    compilation cache."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_terminal_summary(terminalreporter):
    """Report this process's memory maps against the kernel's limit (the failure mode the
    fixture above prevents), so growth shows up before it crashes a run."""
    try:
        used = sum(1 for _ in open("/proc/self/maps"))
        limit = int(open("/proc/sys/vm/max_map_count").read())
    except OSError:  # not Linux
        return
    if used > limit // 4:
        terminalreporter.write_line(f"warning: {used} memory maps of vm.max_map_count={limit} "
                                    "at the end of the run (see tests/conftest.py)", yellow=True)
