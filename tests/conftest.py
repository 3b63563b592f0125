"""Test setup: CPU only, 8 emulated devices; set before jax is imported anywhere.

``gpu``-marked tests run their checks in a fresh interpreter with the caller's own environment (this
process is pinned to CPU), and are skipped, with the reason printed by ``-ra``, where jax has no
GPU backend. ``-m gpu`` selects only them; ``-m "not gpu"`` leaves them out.
"""

import gc
import importlib.metadata
import os
import subprocess
import sys

CALLER_ENV = dict(os.environ)  # before the CPU pinning below: what a GPU check subprocess sees

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# No moejax.runtime.tune_host_malloc here (the entry points apply it for long training loops;
# tests/test_runtime.py checks it in a subprocess): a test process compiles ~1,000 programs, and
# with one arena, no mmap chunks and no trimming its heap never shrank (7.5 GB RSS by the RL tests).

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
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
