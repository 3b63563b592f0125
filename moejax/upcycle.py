"""Dense -> MoE upcycling of a train state (spec: architecture.md sections 6 EMoE, 8.6 DeepSeekMoE
fine-grained experts; sparse upcycling). The target config is the MoE model; its dense source is
the same model without experts (``dense_source``), whose FFN width ``d_ff`` fixes the split:

  * ``copy``  every expert is a copy of the dense FFN (``d_expert == d_ff``). With
              ``norm_topk_prob`` the output equals the dense FFN at any top-k and any router
              (identical experts, weights summing to 1) as long as ``noise == 0``.
  * ``fine``  fine-grained (DeepSeekMoE-style) upcycling: the FFN is cut along its intermediate dim
              into ``m = d_ff / d_expert`` contiguous segments; expert e is segment ``e mod m`` of
              copy ``e // m`` (``num_experts`` a multiple of m), its ``w_down`` scaled by m so the
              expected output under uniform routing matches the dense FFN. Exact when
              ``top_k == num_experts == m`` with ``norm_topk_prob`` (weights 1/m each).
  * ``emoe``  EMoE (section 6.1): keys = the FFN gate weights per neuron (columns of gate [D,F]),
              L2-normalised, clustered by balanced k-means (``balanced_kmeans``: exact
              capacity-constrained assignment, equal cluster sizes F/E); neurons permuted so each
              cluster is a contiguous block = one expert of ``d_expert = F/E``. Routing by average
              key with no new parameters (``router.gating='avg_key'``): a_e(x) = x . mean_{j in e}
              k_j with raw keys, top-k blocks combined with weight 1. Exact for top_k = E.
              The MoE block computes the keys from its current ``w_gate`` at every call (as
              EMoE's code does), so they follow fine-tuning; nothing is stored.
  * ``emoe_learn`` the EMoE experts with a learned router (any ``gating='learned'`` config)
              whose weight is initialised from the average keys [D,E] (dot-product gate, not
              cosine). Use ``norm_topk_prob=True`` with ``routed_scaling=top_k`` to match the
              weight-1 sum of avg-key EMoE at init (approximately).
  * ``dsmoe`` DSMoE (section 8.7; ``model.moe.variant.kind='dsmoe'``): the FFN split along d_ff
              into ``num_experts`` contiguous blocks (``moe_variants.dsmoe_from_dense``, no
              permutation, ``d_expert = F/E``); the per-block sigmoid gate [D,E] takes the fresh
              init ('random') or zeros ('zero': g = 1/2 on every block, so every block is off at
              the default tau = 1/2). Every block on (tau = 0, ``dsmoe_scale='one'``) is the dense
              FFN exactly; at tau = 1/2 with a fresh gate about half the blocks run per token.

BAM's dense source (``dense_source(dm, 'bam')``) is ``moejax.bam.dense_branch_config``; BAM mixes
N trained branches instead of converting one state (``moejax.bam_run``).

Which layers: every MoE layer of the target (``model.moe.first_dense_layers`` / ``moe_every``);
the others keep the dense FFN. EMoE's choice (every 4th layer of the last half, every 2nd of the
last quarter) is ``growth.moe_layers``, resolved by ``apply_moe_layers``.

Router init (copy / fine): ``router_init='zero'`` (uniform softmax, ties go to the lowest expert
ids) or 'random' (the target's fresh init). ``noise`` adds multiplicative Gaussian noise of that
relative std to the expert weights (breaks copy symmetry; not function preserving). Shared
experts, if the target has them, start from the fresh init with a zero ``down`` (preserving).
Attention, norms and embeddings are copied; the optimizer and the router state are fresh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax import train as T
from moejax.bam import dense_branch_config
from moejax.config import UPCYCLE_OPS, Config, ConfigError, ModelConfig, MoEConfig
from moejax.growth import join_layers, split_layers, transform_state
from moejax.layers.moe_variants import dsmoe_from_dense

METHODS = UPCYCLE_OPS
# EMoE's layer choice (section 6.2; LLaMA-7B: every 4th layer from 16 of 32, or every 2nd late):
# (first MoE layer as a fraction of the depth, stride)
MOE_LAYER_CHOICES = {"last_half": (0.5, 4), "last_quarter": (0.75, 2)}


def moe_layer_choice(num_layers: int, choice: str) -> tuple[int, int]:
    """(first_dense_layers, moe_every) of EMoE's layer choice: 'last_half' = every 4th layer from
    L/2, 'last_quarter' = every 2nd from 3L/4 (L=32: [16, 20, 24, 28] / [24, 26, 28, 30])."""
    if choice not in MOE_LAYER_CHOICES:
        raise ValueError(f"moe layer choice {choice!r}: choose from {list(MOE_LAYER_CHOICES)}")
    frac, every = MOE_LAYER_CHOICES[choice]
    return int(num_layers * frac), every


def apply_moe_layers(cfg: Config) -> Config:
    """``cfg`` with ``growth.moe_layers`` resolved into ``model.moe.first_dense_layers`` and
    ``moe_every`` (idempotent; 'all' and dense models are left as they are)."""
    choice, m = cfg.growth.moe_layers, cfg.model
    if choice == "all" or not m.moe.enabled:
        return cfg
    first, every = moe_layer_choice(m.num_layers, choice)
    if m.scan_layers:
        raise ConfigError(f"growth.moe_layers={choice!r} mixes dense and MoE layers, which "
                          "scanned layers cannot (set model.scan_layers=false)")
    moe = dataclasses.replace(m.moe, first_dense_layers=first, moe_every=every, dense_layers=())
    return dataclasses.replace(cfg, model=dataclasses.replace(m, moe=moe))


def dense_source(dm: ModelConfig, method: str = "copy") -> ModelConfig:
    """The dense model that ``method`` upcycles into the MoE model ``dm`` (same d_ff; BAM's
    branches: FFN width d_expert)."""
    if method == "bam":
        return dense_branch_config(dm)
    check(dense := dataclasses.replace(dm, moe=MoEConfig()), dm, method)
    return dense


def check(sm: ModelConfig, dm: ModelConfig, method: str) -> int:
    """Validate a dense -> MoE pair; returns the segments per FFN copy m."""
    m = dm.moe
    if method not in METHODS:
        raise ValueError(f"upcycle method {method!r}: choose from {METHODS}")
    if sm.moe.enabled or not m.enabled:
        raise ValueError("upcycling goes from a dense source to an MoE target")
    if m.router.recurrent != "none" or m.router.num_null_experts:
        raise ValueError("upcycling initialises plain (non-recurrent, no null expert) routers")
    F = sm.d_ff
    if F % m.d_expert:
        raise ValueError(f"d_expert={m.d_expert} must divide the dense d_ff={F}")
    segs = F // m.d_expert
    if method == "copy" and segs != 1:
        raise ValueError(f"copy upcycling needs d_expert == d_ff ({F}), got {m.d_expert}")
    if (method.startswith("emoe") or method == "dsmoe") and segs != m.num_experts:
        raise ValueError(f"{method} needs num_experts * d_expert == d_ff ({F})")
    if (method == "dsmoe") != (m.variant.kind == "dsmoe"):
        raise ValueError("method 'dsmoe' <-> model.moe.variant.kind='dsmoe'")
    if m.num_experts % segs:
        raise ValueError(f"num_experts={m.num_experts} must be a multiple of d_ff/d_expert={segs}")
    if (method == "emoe") != (m.router.gating == "avg_key"):
        raise ValueError("method 'emoe' <-> model.moe.router.gating='avg_key'")
    return segs


def squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """|x_i - c_j|^2 for points x [n,d] and centers [k,d] -> [n,k] (float64)."""
    x, centers = np.asarray(x, np.float64), np.asarray(centers, np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None]
    return np.maximum(d, 0.0)


def balanced_assignment(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Exact size-constrained assignment: labels [n] minimising the total squared distance with
    exactly n/k points per center. Each center becomes n/k identical slots of an [n, n] cost
    matrix solved by ``scipy.optimize.linear_sum_assignment`` (O(n^3) time, n^2 memory: fine for
    FFN widths of a few thousand neurons)."""
    from scipy.optimize import linear_sum_assignment

    n, k = len(x), len(centers)
    if n % k:
        raise ValueError(f"balanced assignment: {n} points do not split into {k} equal clusters")
    slots = np.repeat(squared_distances(x, centers), n // k, axis=1)  # [n, n]: column s -> s // cap
    rows, cols = linear_sum_assignment(slots)
    labels = np.empty(n, np.int64)
    labels[rows] = cols // (n // k)
    return labels


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k initial centers [k,d]: the first uniform, each next drawn with probability proportional
    to its squared distance from the nearest chosen one (k-means++), so blobs get one each."""
    chosen = [int(rng.integers(len(x)))]
    d = squared_distances(x, x[chosen]).min(1)
    for _ in range(k - 1):
        p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1.0 / len(x))
        chosen.append(int(rng.choice(len(x), p=p)))
        d = np.minimum(d, squared_distances(x, x[chosen[-1:]])[:, 0])
    return x[chosen]


def balanced_kmeans(x: np.ndarray, k: int, *, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Size-constrained k-means: labels [n] with exactly n/k points per cluster.

    Lloyd iterations whose assignment step is the exact min-cost balanced assignment
    (``balanced_assignment``, as KMeansConstrained's min-cost flow), so the objective never
    increases; stops when the labels repeat. Init: k-means++ (``seed``)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if n % k:
        raise ValueError(f"balanced k-means: {n} points do not split into {k} equal clusters")
    c = kmeans_plus_plus(x, k, np.random.default_rng(seed))
    labels = None
    for _ in range(max(iters, 1)):
        new = balanced_assignment(x, c)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) for j in range(k)])
    return labels


def emoe_permutation(gate: np.ndarray, num_experts: int, *, iters: int = 30,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """EMoE clustering of one FFN: gate [D,F] -> (perm [F] putting each cluster in a contiguous
    block of F/E neurons, average raw keys [D,E])."""
    keys = np.asarray(gate, np.float64).T  # [F,D]: key of neuron j = column j of gate
    normed = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    labels = balanced_kmeans(normed, num_experts, iters=iters, seed=seed)
    perm = np.argsort(labels, kind="stable")
    avg = keys[perm].reshape(num_experts, -1, keys.shape[1]).mean(1).T  # [D,E]
    return perm, avg.astype(np.float32)


def experts_from_dense(mlp: dict, num_experts: int, segs: int, *, perm=None, down_scale=1.0,
                       noise: float = 0.0, key=None) -> dict:
    """Dense {gate [D,F], up, down [F,D]} -> {w_gate/w_up [E,D,F/m], w_down [E,F/m,D]}: expert e
    is segment ``e mod m`` (of the permuted neurons if ``perm``)."""
    gate, up, down = mlp["gate"], mlp["up"], mlp["down"]
    if perm is not None:
        p = jnp.asarray(perm)
        gate, up, down = gate[:, p], up[:, p], down[p]
    D, F = gate.shape
    f = F // segs
    seg = np.arange(num_experts) % segs
    w_gate = gate.reshape(D, segs, f).transpose(1, 0, 2)[seg]
    w_up = up.reshape(D, segs, f).transpose(1, 0, 2)[seg]
    w_down = down.reshape(segs, f, D)[seg] * down_scale
    out = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    if noise > 0:
        keys = jax.random.split(key, 3)
        out = {k: v * (1.0 + noise * jax.random.normal(kk, v.shape, v.dtype))
               for (k, v), kk in zip(out.items(), keys)}
    return out


def upcycle(state: T.TrainState, src: T.Setup, dst: T.Setup, method: str, *,
            router_init: str = "random", noise: float = 0.0, kmeans_iters: int = 30,
            key=None) -> T.TrainState:
    """Upcycle a dense ``state`` (of ``src``) into ``dst``'s MoE model, created with its shardings."""
    sm, dm = src.cfg.model, dst.cfg.model
    segs = check(sm, dm, method)
    mc = dm.moe
    if router_init not in ("zero", "random"):
        raise ValueError(f"router_init={router_init!r}: choose 'zero' or 'random'")
    if method == "dsmoe" and noise:
        raise ValueError("dsmoe blocks are disjoint slices of the FFN (no copies to break): "
                         "set noise=0")
    moe_layers = [l for l in range(dm.num_layers) if mc.is_moe_layer(l)]
    perms, avg = {}, {}
    if method.startswith("emoe"):
        _, layers = split_layers(jax.device_get(state.params.to_pure_dict()), sm)
        for l in moe_layers:
            perms[l], avg[l] = emoe_permutation(np.asarray(layers[l]["mlp"]["gate"]),
                                                mc.num_experts, iters=kmeans_iters, seed=l)
    down_scale = 1.0 if method.startswith("emoe") else float(segs)

    def params_fn(params, fresh, key):
        top, src_layers = split_layers(params, sm)
        _, fresh_layers = split_layers(fresh, dm)
        keys = jax.random.split(key, dm.num_layers)
        out = []
        for l, (s, f) in enumerate(zip(src_layers, fresh_layers)):
            if l not in moe_layers:
                out.append(s)
                continue
            if method == "dsmoe":
                out.append({**s, "mlp": dsmoe_layer(s["mlp"], f["mlp"], mc.num_experts,
                                                    router_init)})
                continue
            mlp = dict(f["mlp"])
            mlp.update(experts_from_dense(s["mlp"], mc.num_experts, segs, perm=perms.get(l),
                                          down_scale=down_scale, noise=noise, key=keys[l]))
            if "router" in mlp and "w" in mlp["router"]:
                w = f["mlp"]["router"]["w"]
                if method == "emoe_learn":
                    w = jnp.asarray(avg[l]).astype(w.dtype)
                elif router_init == "zero":
                    w = jnp.zeros_like(w)
                mlp["router"] = {**mlp["router"], "w": w}
            if "shared" in mlp:
                mlp["shared"] = {**mlp["shared"], "down": jnp.zeros_like(mlp["shared"]["down"])}
            out.append({**s, "mlp": mlp})
        return join_layers(top, out, dm)

    def rest_fn(rest, fresh):
        return fresh

    return transform_state(state, src, dst, params_fn, rest_fn, key=key)


def dsmoe_layer(dense: dict, fresh: dict, num_experts: int, router_init: str) -> dict:
    """One DSMoE FFN from a dense one: {'experts': the d_ff blocks (``dsmoe_from_dense``),
    'gate' [D,E]: the fresh init, or zeros with ``router_init='zero'``}."""
    gate = fresh["gate"] if router_init == "random" else jnp.zeros_like(fresh["gate"])
    return {**fresh, "gate": gate,
            "experts": dsmoe_from_dense(dense["gate"], dense["up"], dense["down"], num_experts)}
