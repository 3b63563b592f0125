"""moejax.runtime: with the host malloc tuned, XLA:CPU's per-call scratch is reused instead of being
unmapped and faulted back in every call (counted in page faults of a fresh interpreter, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moejax import runtime

PROBE = r"""
import json, os, resource, sys
from moejax.runtime import tune_host_malloc
tuned = tune_host_malloc()
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp

@jax.jit
def step(x):  # a [8192, 8192] fp32 product (256 MiB) materialised between two matmuls
    y = jnp.tanh(x @ x.T)
    return (y @ x).sum()

x = jnp.ones((8192, 64), jnp.float32) / 64
step(x).block_until_ready(); step(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    env = {**os.environ, runtime.ENV: mode}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_the_scratch_and_default_refaults_it():
    keep, default = _probe("keep"), _probe("default")
    assert keep["tuned"] and not default["tuned"]
    pages = 256 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > 0.5 * pages  # the scratch is faulted in again on every call
    assert keep["faults"] < 0.05 * pages


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv(runtime.ENV, "sometimes")
    with pytest.raises(ValueError, match=runtime.ENV):
        runtime.tune_host_malloc()


# -- libtpu flags ------------------------------------------------------------------------------

def _cfg(moe: bool, fsdp: int):
    import dataclasses

    from moejax.testing import tiny_config
    cfg = tiny_config()
    model = cfg.model if not moe else dataclasses.replace(
        cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=4))
    return dataclasses.replace(cfg, model=model,
                               mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=fsdp))


def test_windowed_einsum_goes_off_for_dense_fsdp_only():
    assert runtime.libtpu_flags(_cfg(moe=False, fsdp=4)) == runtime.DENSE_FSDP_FLAGS
    assert runtime.libtpu_flags(_cfg(moe=False, fsdp=1)) == ()
    assert runtime.libtpu_flags(_cfg(moe=True, fsdp=4)) == ()
    assert all(f.endswith("=false") and "windowed_einsum" in f for f in runtime.DENSE_FSDP_FLAGS)


def test_set_libtpu_flags_appends_once_and_the_users_flag_wins(monkeypatch):
    user = "--xla_tpu_enable_windowed_einsum_for_all_gather=true"
    monkeypatch.setenv(runtime.LIBTPU_ENV, f"--foo=1 {user}")
    added = runtime.set_libtpu_flags(_cfg(moe=False, fsdp=4))
    assert added == [runtime.DENSE_FSDP_FLAGS[1]]
    assert os.environ[runtime.LIBTPU_ENV].split() == ["--foo=1", user, runtime.DENSE_FSDP_FLAGS[1]]
    assert runtime.set_libtpu_flags(_cfg(moe=False, fsdp=4)) == []  # nothing twice
    monkeypatch.delenv(runtime.LIBTPU_ENV)
    assert runtime.set_libtpu_flags(_cfg(moe=True, fsdp=4)) == []
    assert runtime.LIBTPU_ENV not in os.environ


# -- benchmarks compile for their own thread count ---------------------------------------------

CACHE_PROBE = r"""
import os, sys
from moejax.runtime import compile_without_cache
if sys.argv[1] == "before":
    compile_without_cache()
import jax, jax.numpy as jnp
entries = lambda: len(os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]))  # noqa: E731
jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
first = entries()
compile_without_cache()
jax.jit(lambda x: x * 3 - 1)(jnp.ones(3)).block_until_ready()
print(first, entries())
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_compile_without_cache_writes_nothing_to_the_persistent_cache(tmp_path, when):
    """Before jax is imported (through the environment) and after (through jax.config): no program
    compiled afterwards goes into ``JAX_COMPILATION_CACHE_DIR``; before the call, one does."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE, when], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    first, last = map(int, out.stdout.split()[-2:])  # cache entries after each program
    assert (first == 0) if when == "before" else (first > 0)
    assert last == first
