"""DGA, Dynamic Gradient Alignment (Fan, Grangier, Ablin; arXiv 2410.02498): online domain
weights alpha for a target (specialist) domain.

Every ``every`` steps: the training gradient g_k of one small batch per generic domain and g_s of
a target batch, restricted to a parameter subset (e.g. the last N layers: ``last_layers``), then
``alpha <- normalise(alpha * exp(eta * <g_k, g_s>))`` with an optional EMA (the methods note's
one-step gradient-alignment reading). All k + 1 gradients and their inner products are ONE jitted
program (``make_alignment_fn``: ``lax.map`` over the stacked domain batches, so one gradient is
live at a time) on the training mesh, sharded like the train step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import train as T
from moejax.config import ModelConfig
from moejax.config_checks import _check_positive, _fail
from moejax.mesh import BATCH_AXES
from moejax.mixing import check_domains, weights_by_name

# A parameter subset: (path of names/indices, leaf) -> True (the whole leaf), False (left out) or
# a slice of the leaf's leading axis (the layer axis of scanned layer stacks).
ParamFilter = Callable[[tuple, Any], "bool | slice"]


@dataclasses.dataclass(frozen=True)
class DGAConfig:
    """DGA's knobs."""

    every: int = 10  # steps between weight updates (each costs k + 1 forward/backward passes)
    eta: float = 1.0  # step size on the gradient inner products
    ema: float = 0.0  # weight kept from the previous alpha (0: no smoothing)

    def __post_init__(self):
        _check_positive("dga.every", self.every)
        _check_positive("dga.eta", self.eta)
        if not 0.0 <= self.ema < 1.0:
            _fail("dga.ema", self.ema, "must lie in [0, 1) (0 disables smoothing)")


# -- the update ---------------------------------------------------------------------------------
def dga_update(alpha: Sequence[float], inner_products: Sequence[float], eta: float,
               ema: float = 0.0) -> np.ndarray:
    """``normalise(alpha * exp(eta * inner_products))`` (in log space, so large products do not
    overflow), then ``(1 - ema) * new + ema * alpha``."""
    alpha = np.asarray(alpha, np.float64)
    with np.errstate(divide="ignore"):  # a zero weight stays zero (log 0 = -inf)
        z = np.log(alpha) + eta * np.asarray(inner_products, np.float64)
    new = np.exp(z - z.max())
    new /= new.sum()
    return (1.0 - ema) * new + ema * alpha


# -- parameter subsets --------------------------------------------------------------------------
def param_path(keypath) -> tuple:
    """A pytree key path as plain names and indices (``('layers', 1, 'mlp', 'up')``)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            out.append(k.name)
    return tuple(out)


def all_params(path: tuple, leaf) -> bool:
    """Every parameter."""
    return True


def last_layers(model: ModelConfig, n: int) -> ParamFilter:
    """The parameters of the last ``n`` decoder layers (scanned or unrolled alike)."""
    if not 1 <= n <= model.num_layers:
        raise ValueError(f"n={n}: must lie in [1, model.num_layers={model.num_layers}]")
    first = model.num_layers - n

    def select(path: tuple, leaf) -> bool | slice:
        if path[0] != "layers":
            return False
        return slice(first, None) if model.scan_layers else path[1] >= first
    return select


def selected(tree, param_filter: ParamFilter) -> list:
    """The leaves (or leading-axis slices) of ``tree`` that ``param_filter`` picks, in tree
    order."""
    out = []
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        which = param_filter(param_path(keypath), leaf)
        if which is True:
            out.append(leaf)
        elif which is not False:
            out.append(leaf[which])
    if not out:
        raise ValueError("the parameter filter picked no parameter")
    return out


# -- the jitted alignment -----------------------------------------------------------------------
STACKED_KEYS = (*T.BATCH_KEYS_2D, "domain")


def stacked_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """[k, B, ...] domain batches: the domain axis replicated, rows over the batch axes."""
    return {k: NamedSharding(mesh, P(None, BATCH_AXES, *([None] if k != "domain" else [])))
            for k in STACKED_KEYS}


def _fields(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The fields a gradient reads (``domain`` zeros where the batch has none)."""
    out = {k: np.asarray(batch[k]) for k in T.BATCH_KEYS_2D}
    out["domain"] = np.asarray(batch.get("domain", np.zeros(out["inputs"].shape[0], np.int32)))
    return out


def stack_batches(mesh: Mesh, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
    """This process's rows of k domain batches as global [k, B, ...] arrays on ``mesh``."""
    fields = [_fields(b) for b in batches]
    sh = stacked_shardings(mesh)
    return {k: jax.make_array_from_process_local_data(sh[k], np.stack([f[k] for f in fields]))
            for k in STACKED_KEYS}


def target_global(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows of the target batch as a global batch on ``mesh``."""
    return T.global_batch(mesh, _fields(batch))


def make_alignment_fn(s: T.Setup, param_filter: ParamFilter = all_params) -> Callable:
    """Jitted ``(state, stacked, target) -> [k]`` fp32 inner products <g_k, g_s> of the train
    step's gradient (``moejax.train.make_grad_fn``: LM loss plus MoE aux losses, accumulated over
    ``train.grad_accum``) on domain batch k and on the target batch, over the ``param_filter``
    subset.
    ``stacked``: ``stack_batches``; ``target``: ``target_global``. Output replicated."""
    grad_fn = T.make_grad_fn(s, 1)  # per-domain loss sums are not used

    def alignment(state: T.TrainState, stacked: dict, target: dict) -> jax.Array:
        g_s = selected(grad_fn(state, target)[1], param_filter)

        def inner_product(batch: dict) -> jax.Array:
            g_k = selected(grad_fn(state, batch)[1], param_filter)
            return sum(jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))
                       for a, b in zip(g_k, g_s, strict=True))
        return jax.lax.map(inner_product, stacked)  # [k]

    return jax.jit(alignment,
                   in_shardings=(s.state_shardings, stacked_shardings(s.mesh),
                                 T.batch_shardings(s.mesh)),
                   out_shardings=NamedSharding(s.mesh, P()))


def domain_gradient_alignment(s: T.Setup, state: T.TrainState,
                              batches_by_domain: Mapping[str, Mapping[str, Any]],
                              target_batch: Mapping[str, Any],
                              param_filter: ParamFilter = all_params) -> dict[str, float]:
    """``{domain: <g_domain, g_target>}`` once (compiles ``make_alignment_fn`` each call: a
    loop should build that once, as ``DGAMixer`` does)."""
    names = list(batches_by_domain)
    fn = make_alignment_fn(s, param_filter)
    ips = fn(state, stack_batches(s.mesh, [batches_by_domain[d] for d in names]),
             target_global(s.mesh, target_batch))
    return weights_by_name(names, np.asarray(jax.device_get(ips)))


# -- the mixer ----------------------------------------------------------------------------------
class DGAMixer:
    """DGA as a ``Trainer`` mixer: at every step that is a multiple of ``cfg.every`` (step 0
    included) it takes ``domain_batches(step) -> {domain: batch}`` and ``target_batch(step)``
    (this process's rows; make them functions of ``step`` so a resumed run sees the same
    batches), the gradient alignment on ``state_of(trainer)`` (the current train state) and
    returns the updated alpha. ``alignment_fn`` (``make_alignment_fn``) is built from
    ``trainer.setup`` on first use unless given."""

    def __init__(self, domains: Sequence[str],
                 domain_batches: Callable[[int], Mapping[str, Mapping[str, Any]]],
                 target_batch: Callable[[int], Mapping[str, Any]], cfg: DGAConfig = DGAConfig(),
                 *, param_filter: ParamFilter = all_params, initial: Sequence[float] | None = None,
                 alignment_fn: Callable | None = None,
                 state_of: Callable[[Any], T.TrainState] = lambda trainer: trainer.state):
        self.domains = check_domains(domains)
        k = len(self.domains)
        alpha = np.full(k, 1.0 / k) if initial is None else np.asarray(initial, np.float64)
        if alpha.shape != (k,) or np.any(alpha < 0) or not alpha.sum() > 0:
            raise ValueError(f"initial={initial!r}: give {k} weights >= 0, not all zero")
        self.alpha = alpha / alpha.sum()
        self.cfg, self.param_filter, self.state_of = cfg, param_filter, state_of
        self.domain_batches, self.target_batch = domain_batches, target_batch
        self.alignment_fn = alignment_fn
        self.inner_products: np.ndarray | None = None  # of the last update [k]
        self.updates = 0

    def _inner_products(self, trainer, step: int) -> np.ndarray:
        s = trainer.setup
        if self.alignment_fn is None:
            self.alignment_fn = make_alignment_fn(s, self.param_filter)
        batches = self.domain_batches(step)
        missing = [d for d in self.domains if d not in batches]
        if missing:
            raise KeyError(f"domain_batches({step}) gave no batch for domain(s) {missing}")
        ips = self.alignment_fn(self.state_of(trainer),
                                stack_batches(s.mesh, [batches[d] for d in self.domains]),
                                target_global(s.mesh, self.target_batch(step)))
        return np.asarray(jax.device_get(ips), np.float64)

    def before_step(self, trainer, step: int) -> dict[str, float] | None:
        if step % self.cfg.every:
            return None
        self.inner_products = self._inner_products(trainer, step)
        self.alpha = dga_update(self.alpha, self.inner_products, self.cfg.eta, self.cfg.ema)
        self.updates += 1
        return weights_by_name(self.domains, self.alpha)

    def state(self) -> dict:
        return {"domains": list(self.domains), "alpha": self.alpha.tolist(),
                "inner_products": (None if self.inner_products is None
                                   else self.inner_products.tolist()),
                "updates": self.updates}

    def load_state(self, state: dict) -> None:
        if list(state["domains"]) != list(self.domains):
            raise ValueError(f"DGA state over domains {state['domains']} cannot resume a run "
                             f"over {list(self.domains)}")
        self.alpha = np.asarray(state["alpha"], np.float64)
        ips = state["inner_products"]
        self.inner_products = None if ips is None else np.asarray(ips, np.float64)
        self.updates = int(state["updates"])
