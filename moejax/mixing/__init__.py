"""Data-mixture algorithms: RegMix (``regmix``: offline proxy sweep + regression), Aioli
(``aioli``: online LearnParams rounds) and DGA (``dga``: online gradient alignment).

The online ones are *mixers* for ``Trainer(..., mixer=obj)``: before every step the trainer calls
``obj.before_step(trainer, step)`` (``step``: optimizer steps done so far) and, when it returns a
``{domain name: weight}`` dict, the data mixture takes those weights for the batches that follow;
``obj.state()`` (a JSON-able dict) is saved in the same checkpoint step as the data iterator and
``obj.load_state(d)`` restores it, so an interrupted run continues with the same weights
(the protocol: ``moejax.data.mixture.Mixer``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def check_domains(domains: Sequence[str], *, minimum: int = 1) -> tuple[str, ...]:
    """``domains`` as a tuple of unique names (at least ``minimum``), else ValueError."""
    domains = tuple(domains)
    if len(domains) < minimum or len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains!r}: give at least {minimum} distinct domain names")
    return domains


def weights_by_name(domains: Sequence[str], p: np.ndarray) -> dict[str, float]:
    """``{domain: float weight}`` in ``domains`` order (plain floats: JSON-able, exact)."""
    return {d: float(w) for d, w in zip(domains, np.asarray(p, np.float64), strict=True)}
