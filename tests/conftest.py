"""Test setup: CPU only, 8 emulated devices; set before jax is imported anywhere.

``gpu``-marked tests run their checks in a fresh interpreter with the caller's own environment (this
process is pinned to CPU), and are skipped, with the reason printed by ``-ra``, where jax has no
GPU backend. ``-m gpu`` selects only them; ``-m "not gpu"`` leaves them out.
"""

import importlib.metadata
import os
import subprocess
import sys

CALLER_ENV = dict(os.environ)  # before the CPU pinning below: what a GPU check subprocess sees

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

from moejax.runtime import tune_host_malloc  # noqa: E402

tune_host_malloc()  # as every entry point: XLA's per-step scratch is reused, not re-faulted

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
