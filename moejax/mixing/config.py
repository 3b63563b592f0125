"""The configuration of a data-mixing run: ``MixRunConfig`` is a ``moejax.config.Config`` plus a
``mixing`` section (the method, its knobs, the DGA target domain and the mixers' held-out
batches). Dotted overrides work as for any config (``--set mixing.aioli.eta=2``); every invalid
value raises ``ConfigError`` naming its field (and the domain, for per-domain values).

The training mixture is over ``data.domains`` minus ``mixing.target_domain`` (the target gets
weight 0 in every arm, so arms compare at matched tokens; it is used only for DGA's g_s and for
evaluation). ``data.mixture`` is not read: each method sets the weights (``moejax.mixing.run``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from moejax.config import Config
from moejax.config_checks import _check_choice, _check_positive, _fail
from moejax.mixing.aioli import AioliConfig
from moejax.mixing.dga import DGAConfig

METHODS = ("natural", "uniform", "regmix", "aioli", "dga")
MEAN_METRIC = "mean"  # RegMix's default target: the mean val loss over the training domains


@dataclasses.dataclass(frozen=True)
class RegMixConfig:
    """RegMix's sweep: ``num_proxies`` proxies fit the regressor, ``held_out`` more score its
    Spearman; proxies are the target run at ``proxy_*`` size (0 keeps the target's value).
    ``num_larger`` runs at ``larger_*`` size (full ``train.steps``) check rank invariance."""

    num_proxies: int = 32
    held_out: int = 8
    proxy_steps: int = 0  # 0: train.steps
    proxy_num_layers: int = 0  # 0: model.num_layers
    proxy_d_model: int = 0  # 0: model.d_model (model.d_ff scales with it)
    num_larger: int = 0  # larger runs on held-out mixtures (rank invariance); 0: none
    larger_num_layers: int = 0
    larger_d_model: int = 0
    candidates: int = 100_000
    top_k: int = 100
    regressor: Literal["linear", "lgbm"] = "linear"
    metric: str = MEAN_METRIC  # "mean" or a domain name (its val loss)
    seed: int = 0  # the sampled proxy mixtures and candidates
    max_workers: int = 1  # proxies trained concurrently (threads in one process)

    def __post_init__(self):
        for name in ("num_proxies", "held_out", "candidates", "top_k", "max_workers"):
            _check_positive(f"mixing.regmix.{name}", getattr(self, name))
        for name in ("proxy_steps", "proxy_num_layers", "proxy_d_model", "num_larger",
                     "larger_num_layers", "larger_d_model"):
            if getattr(self, name) < 0:
                _fail(f"mixing.regmix.{name}", getattr(self, name), "must be >= 0 (0: default)")
        if self.num_proxies < 2:
            _fail("mixing.regmix.num_proxies", self.num_proxies, "fit on at least 2 proxies")
        if self.held_out < 3:
            _fail("mixing.regmix.held_out", self.held_out,
                  "give at least 3 held-out proxies (Spearman of fewer is meaningless)")
        if self.num_larger > self.held_out:
            _fail("mixing.regmix.num_larger", self.num_larger,
                  f"larger runs reuse held-out mixtures: at most held_out={self.held_out}")
        if self.top_k > self.candidates:
            _fail("mixing.regmix.top_k", self.top_k,
                  f"must be <= mixing.regmix.candidates={self.candidates}")
        _check_choice("mixing.regmix.regressor", self.regressor, ("linear", "lgbm"))


@dataclasses.dataclass(frozen=True)
class MixingConfig:
    """How the training domains are weighted (``method``) and what the mixers measure on."""

    method: str = "natural"
    target_domain: str = ""  # DGA's specialist domain ("" = none); weight 0 in every arm
    # the natural distribution, one per data.domains entry (the target's is ignored); empty:
    # the corpus's training token shares
    natural: tuple[float, ...] = ()
    aioli: AioliConfig = AioliConfig()
    dga: DGAConfig = DGAConfig()
    dga_layers: int = 0  # DGA's gradients on the last N layers' parameters; 0: all parameters
    regmix: RegMixConfig = RegMixConfig()
    eval_batches: int = 1  # held-out batches per domain for Aioli's loss measurements
    eval_batch_size: int = 0  # rows of each mixer batch (Aioli's and DGA's); 0: train.batch_size

    def __post_init__(self):
        _check_choice("mixing.method", self.method, METHODS)
        _check_positive("mixing.eval_batches", self.eval_batches)
        if self.eval_batch_size < 0:
            _fail("mixing.eval_batch_size", self.eval_batch_size, "must be >= 0 (0: batch size)")
        if self.dga_layers < 0:
            _fail("mixing.dga_layers", self.dga_layers, "must be >= 0 (0: all parameters)")


@dataclasses.dataclass(frozen=True)
class MixRunConfig(Config):
    """A whole mixing run: model/mesh/data/train plus ``mixing``."""

    mixing: MixingConfig = dataclasses.field(default_factory=MixingConfig)

    @property
    def training_domains(self) -> tuple[str, ...]:
        """``data.domains`` without the target domain: the domains the mixture weights."""
        return tuple(d for d in self.data.domains if d != self.mixing.target_domain)

    def __post_init__(self):
        super().__post_init__()
        m, domains = self.mixing, tuple(self.data.domains)
        if m.target_domain and m.target_domain not in domains:
            _fail("mixing.target_domain", m.target_domain,
                  f"unknown domain: it must be one of data.domains={domains} (it is evaluated "
                  "and gives DGA's target gradient, with training weight 0)")
        if m.method == "dga" and not m.target_domain:
            _fail("mixing.target_domain", m.target_domain,
                  f"DGA needs a target domain: one of data.domains={domains}")
        train = self.training_domains
        if len(train) < 2:
            _fail("data.domains", domains, "give at least 2 training domains besides "
                  f"mixing.target_domain={m.target_domain!r}")
        self._check_natural(domains, train)
        if m.regmix.metric != MEAN_METRIC and m.regmix.metric not in domains:
            _fail("mixing.regmix.metric", m.regmix.metric,
                  f"unknown domain: give {MEAN_METRIC!r} or one of data.domains={domains}")
        if m.method == "aioli":
            m.aioli.check_domains(len(train))
        if m.dga_layers > self.model.num_layers:
            _fail("mixing.dga_layers", m.dga_layers,
                  f"must be <= model.num_layers={self.model.num_layers}")
        if m.method == "regmix" and m.regmix.proxy_steps > self.train.steps:
            _fail("mixing.regmix.proxy_steps", m.regmix.proxy_steps,
                  f"proxies are small and short: at most train.steps={self.train.steps}")

    def _check_natural(self, domains: tuple[str, ...], train: tuple[str, ...]) -> None:
        """``mixing.natural``: one finite weight >= 0 per domain, not all zero over the training
        domains, and > 0 on each of them for RegMix (its Dirichlet centre)."""
        natural = self.mixing.natural
        if not natural:
            return
        if len(natural) != len(domains):
            _fail("mixing.natural", natural,
                  f"give one weight per data.domains entry ({len(domains)}: {domains})")
        for d, w in zip(domains, natural):
            if not (w >= 0 and w != float("inf")):
                _fail(f"mixing.natural[{d}]", w, f"domain {d!r}'s weight must be finite and >= 0")
        by_name = dict(zip(domains, natural))
        if sum(by_name[d] for d in train) <= 0:
            _fail("mixing.natural", natural,
                  f"all zero on the training domains {train}: give one a positive weight")
        if self.mixing.method == "regmix":
            for d in train:
                if by_name[d] <= 0:
                    _fail(f"mixing.natural[{d}]", by_name[d], f"RegMix's Dirichlet is centred on "
                          f"the natural distribution: domain {d!r} needs a weight > 0")
