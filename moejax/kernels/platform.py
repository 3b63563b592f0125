"""The platform kernels are chosen for: jax's default backend, or the one named by
``target_platform`` while compiling ahead of time for an accelerator this host does not have."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("moejax_kernel_platform",
                                                                    default=None)


def current() -> str:
    """'cpu', 'gpu' or 'tpu': the ``target_platform`` in force, else ``jax.default_backend()``."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Resolve kernels ('auto' impls, the 'pallas' gmm body) for ``platform`` inside the block,
    e.g. to lower for a TPU topology from a CPU host. Trace fresh ``jax.jit`` functions inside it:
    jit's trace cache does not see this setting."""
    if platform not in PLATFORMS:
        raise ValueError(f"target platform {platform!r} is unknown; choose one of {PLATFORMS}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
