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
