"""Test setup: CPU only, 8 emulated devices; set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, "conftest must run before anything imports jax"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One corpus/token cache for the whole session (built on first use by moejax.data)."""
    return str(tmp_path_factory.mktemp("moejax-cache"))
