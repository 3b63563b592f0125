"""Router catalog: pure fp32 routing functions plus thin NNX modules (spec: architecture.md §0, 4, 7, 8).

Every router returns ``Routing`` (token-major slots) or ``ExpertChoice`` (expert-major); the MoE layer
dispatches from it and ``router_stats`` turns it into the per-layer statistics the balance losses use.
Slots that carry no expert (null expert chosen, masked expert, top-p slot unused) hold expert -1 and
weight 0. All math is float32 whatever the model dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError
from moejax.layers import param

MASK_VALUE = -1e9  # finite "-inf" for masked logits: exp() underflows to exactly 0 in fp32
_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Token-choice routing result (T tokens, S slots, E_all = real + null experts)."""

    experts: jax.Array  # [T,S] int32 expert id per slot; -1 = empty slot
    weights: jax.Array  # [T,S] f32 combine weight per slot (0 for empty slots)
    probs: jax.Array  # [T,E_all] f32 probabilities p_i for the balance loss (sigmoid: s / sum s)
    logits: jax.Array  # [T,E_all] f32 raw logits (z-loss)
    selected: jax.Array  # [T,E_all] f32 0/1 selection mask (null experts included)
    log_probs: jax.Array  # [T,E_all] f32 log(probs) from the logits (finite where probs == 0)
    dropped: jax.Array  # [T] f32 selections lost to a slot cap (top-p max_slots); 0 elsewhere


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing result: expert e processes tokens[e] with weights[e]."""

    tokens: jax.Array  # [E,C] int32 token index per expert slot
    weights: jax.Array  # [E,C] f32 softmax score of that token for that expert
    probs: jax.Array  # [T,E] f32
    logits: jax.Array  # [T,E] f32
    selected: jax.Array  # [T,E] f32 0/1: token t is processed by expert e
    log_probs: jax.Array  # [T,E] f32 log_softmax(logits)


def _renorm(w: jax.Array) -> jax.Array:
    """w [T,S] / its row sum; rows summing to 0 stay 0 (no NaN)."""
    s = jnp.sum(w, axis=-1, keepdims=True)
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 0.0)


def _replicated(x: jax.Array) -> jax.Array:
    """x resharded to replicated when it is sharded (explicit mesh axes): for global rankings."""
    sh = jax.typeof(x).sharding
    if isinstance(sh, jax.sharding.NamedSharding) and any(p is not None for p in sh.spec):
        x = jax.sharding.reshard(x, jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec()))
    return x


def _selected_mask(experts: jax.Array, n: int) -> jax.Array:
    """experts [T,S] (-1 = empty) -> [T,n] f32 0/1."""
    return jnp.sum(jax.nn.one_hot(experts, n, dtype=jnp.float32), axis=1)  # one_hot(-1) = 0


def _scores(logits: jax.Array, score: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 logits [T,E_all] -> (scores s that weight the experts, probs, log_probs), all dense
    [T,E_all]: softmax over all columns, or elementwise sigmoid with probs = s / sum s."""
    if score == "softmax":
        s = jax.nn.softmax(logits, axis=-1)
        return s, s, jax.nn.log_softmax(logits, axis=-1)
    if score == "sigmoid":
        s = jax.nn.sigmoid(logits)
        total = jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-20)
        return s, s / total, jax.nn.log_sigmoid(logits) - jnp.log(total)
    raise ValueError(f"score={score!r}: choose 'softmax' or 'sigmoid'")


def _slot_weights(s: jax.Array, experts: jax.Array, empty: jax.Array, *, renorm: bool,
                  routed_scaling: float) -> jax.Array:
    """Combine weights [T,k]: the dense scores s [T,E_all] gathered at experts [T,k] (never a
    scatter-zeroed copy: replayed ids outside the live top-k keep their score and gradient),
    0 on empty slots, renormalised if ``renorm``, times ``routed_scaling``."""
    w = jnp.take_along_axis(s, jnp.clip(experts, 0, s.shape[1] - 1), axis=1)
    w = jnp.where(empty, 0.0, w)
    if renorm:
        w = _renorm(w)
    return w * routed_scaling


def topk_route(logits: jax.Array, k: int, *, score: str = "softmax", norm_topk_prob: bool = True,
               routed_scaling: float = 1.0, bias: jax.Array | None = None, group_mode: str = "none",
               num_groups: int = 1, topk_groups: int = 1, group_score: str = "topsum",
               moge_renormalize: bool = False, num_null: int = 0,
               mask: jax.Array | None = None, drop_top: int = 0) -> Routing:
    """Token-choice top-k (§0 softmax, §8.12 DeepSeek-V3 sigmoid, §8.6 limited, §8.11 MoGE, §8.4 AdaMoE).

    logits [T,E_all], the last ``num_null`` columns being AdaMoE null experts. Scores s are softmax
    over all E_all columns or elementwise sigmoid. Selection ranks s + bias (bias [E], aux-loss-free,
    §8.12); weights are always the unbiased s of the chosen experts, renormalised if
    ``norm_topk_prob``, then times ``routed_scaling``.
    * 'limited' (DeepSeek-V2/V3 device/node-limited): ``group_score='topsum'`` (V3) scores a group
      by the sum of the top-m selection scores inside it with m = max(1, k // topk_groups) capped
      at the group size (V3: k=8 over 4 nodes -> top-2 sum); 'max' (V2) by its best expert's
      score; keep the best ``topk_groups`` groups, then top-k among their experts.
    * 'moge' (Pangu MoGE): top-(k/num_groups) inside each group of E/num_groups experts; slots
      are group-major; weights are the global scores, renormalised only if ``moge_renormalize``
      (``norm_topk_prob`` does not apply).
    * Null experts: slots choosing one become empty; the real weights are always renormalised to
      sum 1 (AdaMoE), and a token with no real expert gets all-zero weights.
    * ``mask`` [T,E] additive (MaskMoE, 0 / MASK_VALUE): slots that land on a masked expert (only
      when k exceeds the visible experts) become empty, like null slots.
    * ``drop_top`` > 0 (robustness probe, §8.2; not with MoGE): the slots of the ``drop_top``
      best-ranked picks (slots 0 .. drop_top-1: top_k sorts them) become empty, like null slots.
    """
    logits = logits.astype(jnp.float32)
    T, E_all = logits.shape
    E = E_all - num_null
    if group_mode != "none" and num_null:
        raise ValueError("group-limited / MoGE routing does not combine with null experts")
    if mask is not None:
        logits = logits + jnp.pad(mask.astype(jnp.float32), ((0, 0), (0, num_null)))
    s, probs, log_probs = _scores(logits, score)
    sel = s if bias is None else s + jnp.pad(bias.astype(jnp.float32), (0, num_null))  # [T,E_all]
    if mask is not None:  # a bias must never lift an invisible expert over a visible one
        sel = jnp.where(jnp.pad(mask, ((0, 0), (0, num_null))) < 0, -jnp.inf, sel)

    if group_mode == "moge":
        G = num_groups
        if E % G or k % G:
            raise ValueError(f"MoGE needs num_groups={G} to divide E={E} and k={k}")
        ng = E // G
        _, idx = jax.lax.top_k(sel.reshape(T, G, ng), k // G)  # [T,G,k/G]
        experts = (idx + (jnp.arange(G) * ng)[None, :, None]).reshape(T, k)
    else:
        if group_mode == "limited":
            G = num_groups
            ng = E // G
            if E % G or k > topk_groups * ng:
                raise ValueError(f"limited routing: E={E}, num_groups={G}, topk_groups="
                                 f"{topk_groups}, k={k} are inconsistent")
            m = 1 if group_score == "max" else min(max(1, k // topk_groups), ng)
            if group_score not in ("topsum", "max"):
                raise ValueError(f"group_score={group_score!r}: choose 'topsum' or 'max'")
            gscore = jnp.sum(jax.lax.top_k(sel.reshape(T, G, ng), m)[0], axis=-1)  # [T,G]
            _, gidx = jax.lax.top_k(gscore, topk_groups)  # [T,topk_groups]
            keep = jnp.sum(jax.nn.one_hot(gidx, G, dtype=jnp.float32), axis=1) > 0  # [T,G]
            sel = jnp.where(jnp.repeat(keep, ng, axis=1), sel, -jnp.inf)
        elif group_mode != "none":
            raise ValueError(f"group_mode={group_mode!r}: choose 'none', 'limited' or 'moge'")
        _, experts = jax.lax.top_k(sel, k)  # [T,k]
    masked = jnp.zeros(experts.shape, bool)
    if mask is not None:  # a slot on an invisible expert (k > visible experts) carries nothing
        mk = jnp.take_along_axis(mask.astype(jnp.float32), jnp.minimum(experts, E - 1), axis=1)
        masked = (experts < E) & (mk < 0)
    sel_mask = _selected_mask(jnp.where(masked, -1, experts), E_all)  # null picks count too
    if drop_top:
        if group_mode == "moge":
            raise ValueError("drop_top: MoGE slots are group-major, not ranked")
        masked = masked | (jnp.arange(experts.shape[1]) < drop_top)[None, :]
        sel_mask = _selected_mask(jnp.where(masked, -1, experts), E_all)
    empty = masked | (experts >= E)
    renorm = moge_renormalize if group_mode == "moge" else norm_topk_prob
    w = _slot_weights(s, experts, empty, renorm=renorm or num_null > 0,
                      routed_scaling=routed_scaling)  # [T,k] unbiased scores
    experts = jnp.where(empty, -1, experts).astype(jnp.int32)
    return Routing(experts, w, probs, logits, sel_mask, log_probs, jnp.zeros((T,), jnp.float32))


def forced_route(logits: jax.Array, forced: jax.Array, *, score: str = "softmax",
                 norm_topk_prob: bool = True, routed_scaling: float = 1.0,
                 num_null: int = 0) -> Routing:
    """Routing replay (R2/R3, rl-and-data.md B.5.1): the recorded expert sets ``forced`` [T,k]
    int32 (slot order kept; -1, or a null expert's id, = empty slot) with combine weights from the
    *live* scores, exactly as ``topk_route`` weights its own picks: s = softmax over all E_all
    logits (with ``norm_topk_prob`` this is the softmax over the forced experts' logits) or
    sigmoid(logits), gathered at the forced ids, renormalised if ``norm_topk_prob`` (always with
    null experts), times ``routed_scaling``. Gradients reach the router through s. No bias, mask
    or group limit applies; probs / log_probs / logits stay the live ones (balance losses from
    live scores), ``selected`` is the forced one-hot."""
    logits = logits.astype(jnp.float32)
    T, E_all = logits.shape
    E = E_all - num_null
    forced = forced.astype(jnp.int32)
    s, probs, log_probs = _scores(logits, score)
    empty = (forced < 0) | (forced >= E)
    w = _slot_weights(s, forced, empty, renorm=norm_topk_prob or num_null > 0,
                      routed_scaling=routed_scaling)
    experts = jnp.where(empty, -1, forced)
    return Routing(experts, w, probs, logits, _selected_mask(experts, E_all), log_probs,
                   jnp.zeros((T,), jnp.float32))


def topp_route(logits: jax.Array, p: float, max_slots: int, *, num_null: int = 0) -> Routing:
    """Top-p dynamic routing (Huang et al. 2024, §8.5).

    Softmax probs sorted descending; keep the smallest prefix whose cumulative mass reaches ``p``,
    the crossing expert included (keep sorted j iff the mass before j is < p). Weights are the raw
    probabilities (no renormalisation). Only the first ``max_slots`` kept experts get slots; the
    rest are counted per token in ``dropped``. Null experts (last columns) give empty slots.
    """
    logits = logits.astype(jnp.float32)
    T, E_all = logits.shape
    E = E_all - num_null
    probs = jax.nn.softmax(logits, axis=-1)
    ps, idx = jax.lax.top_k(probs, E_all)  # [T,E_all] sorted descending
    before = jnp.concatenate([jnp.zeros((T, 1), jnp.float32), jnp.cumsum(ps, axis=-1)[:, :-1]], 1)
    keep_all = (before < p) & (ps > 0)  # [T,E_all] exclusive prefix mass < p; never a 0-prob expert
    S = min(max_slots, E_all)
    keep = keep_all[:, :S]
    dropped = jnp.sum(keep_all, -1).astype(jnp.float32) - jnp.sum(keep, -1).astype(jnp.float32)
    chosen = jnp.where(keep, idx[:, :S], -1)
    experts = jnp.where(chosen >= E, -1, chosen).astype(jnp.int32)
    weights = jnp.where(experts >= 0, ps[:, :S], 0.0)
    return Routing(experts, weights, probs, logits, _selected_mask(chosen, E_all),
                   jax.nn.log_softmax(logits, axis=-1), dropped)


def expert_choice_capacity(capacity: float, tokens, k: int, num_experts: int):
    """Tokens per expert C = min(T, ceil(capacity * T * k / E)); works on a traced token count."""
    if isinstance(tokens, int):
        return min(tokens, int(math.ceil(capacity * tokens * k / num_experts)))
    c = jnp.ceil(capacity * tokens.astype(jnp.float32) * k / num_experts).astype(jnp.int32)
    return jnp.minimum(tokens.astype(jnp.int32), c)


def expert_choice_route(logits: jax.Array, capacity: float, k: int,
                        valid: jax.Array | None = None) -> ExpertChoice:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    logits [T,E]; C = min(T, ceil(capacity * T * k / E)) slots per expert. With ``valid`` [T]
    (False = padding) only the n valid tokens compete and only the first
    min(n, ceil(capacity * n * k / E)) slots are used (the rest hold token -1, weight 0), so a
    padded batch routes its real tokens exactly as the same tokens without padding.
    """
    logits = logits.astype(jnp.float32)
    T, E = logits.shape
    C = expert_choice_capacity(capacity, T, k, E)
    probs = jax.nn.softmax(logits, axis=-1)
    full = _replicated(probs)  # each expert ranks all tokens: gather a batch-sharded token axis
    if valid is None:
        rank, used = full, jnp.ones((C,), bool)
    else:
        v = _replicated(valid)
        rank = jnp.where(v[:, None], full, -1.0)
        used = jnp.arange(C) < expert_choice_capacity(capacity, jnp.sum(v), k, E)  # [C]
    _, tokens = jax.lax.top_k(rank.T, C)  # [E,C]
    weights = jnp.where(used[None, :], jnp.take_along_axis(full.T, tokens, axis=1), 0.0)
    tokens = jnp.where(used[None, :], tokens, -1)
    selected = jnp.sum(jax.nn.one_hot(tokens, T, dtype=jnp.float32), axis=1).T  # [T,E]
    return ExpertChoice(tokens.astype(jnp.int32), weights, probs, logits, selected,
                        jax.nn.log_softmax(logits, axis=-1))


def maskmoe_mask(token_frequencies, num_experts: int, *, frequent_fraction: float,
                 frequent_visible: int, seed, vocab_size: int | None = None) -> jax.Array:
    """MaskMoE fixed per-token-id expert masks (Su et al. 2024, §8.3) -> [V,E] f32 additive mask.

    The top ``ceil(frequent_fraction * V)`` ids by frequency (ties: lower id first; ``None``
    frequencies = all tied, so the lowest ids are "frequent") see ``frequent_visible`` experts, the
    rest see 1; visible sets are uniform random subsets drawn from ``seed`` (int or PRNG key).
    Visible = 0, invisible = MASK_VALUE. Traceable (works under nnx.eval_shape).
    """
    if token_frequencies is None:
        if vocab_size is None:
            raise ValueError("maskmoe_mask: pass token_frequencies or vocab_size")
        freq = jnp.zeros((vocab_size,), jnp.float32)
    else:
        freq = jnp.asarray(token_frequencies, jnp.float32)
    V = freq.shape[0]
    n_freq = int(math.ceil(frequent_fraction * V))
    order = jnp.argsort(-freq, stable=True)  # ids by descending frequency
    rank = jnp.zeros((V,), jnp.int32).at[order].set(jnp.arange(V, dtype=jnp.int32))
    n_vis = jnp.where(rank < n_freq, min(frequent_visible, num_experts), 1)  # [V]
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    u = jax.random.uniform(key, (V, num_experts))
    erank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # random permutation rank per id
    return jnp.where(erank < n_vis[:, None], 0.0, MASK_VALUE).astype(jnp.float32)


def gru_cell(params: dict, x: jax.Array, h: jax.Array) -> jax.Array:
    """RMoE shared GRU cell (§4.1, PyTorch gate order r, z, n; b_hn inside r * (...)).

    params: w_i [p,3p], w_h [p,3p], b_i [3p], b_h [3p]; x, h [T,p] -> h' [T,p].
    """
    gi = jnp.dot(x, params["w_i"], precision=_HI) + params["b_i"]
    gh = jnp.dot(h, params["w_h"], precision=_HI) + params["b_h"]
    ir, iz, inn = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(ir + hr)
    z = jax.nn.sigmoid(iz + hz)
    n = jnp.tanh(inn + r * hn)
    return (1.0 - z) * n + z * h


def rnn_cell(params: dict, x: jax.Array, h: jax.Array) -> jax.Array:
    """RMoE 'rnn' variant (§4.1): h' = tanh(x W_i + h W_h + b); w_i, w_h [p,p], b [p]."""
    return jnp.tanh(jnp.dot(x, params["w_i"], precision=_HI)
                    + jnp.dot(h, params["w_h"], precision=_HI) + params["b"])


def init_gru_params(key: jax.Array, p: int, kind: str = "gru", init: str = "default",
                    std: float = 0.02) -> dict:
    """Params of the GRU (or, kind='rnn', the tanh RNN): init='default' is PyTorch's
    U(-1/sqrt(p), 1/sqrt(p)); 'normal' is N(0, std) on every weight and bias (RMoE's reference
    code applies its Megatron init_method to all cell parameters)."""
    g = 3 if kind == "gru" else 1
    shapes = ({"w_i": (p, g * p), "w_h": (p, g * p), "b_i": (g * p,), "b_h": (g * p,)}
              if kind == "gru" else {"w_i": (p, p), "w_h": (p, p), "b": (p,)})
    keys = jax.random.split(key, len(shapes))
    if init == "normal":
        return {n: std * jax.random.normal(kk, s, jnp.float32)
                for kk, (n, s) in zip(keys, shapes.items())}
    if init != "default":
        raise ValueError(f"init={init!r}: choose 'default' or 'normal'")
    a = 1.0 / math.sqrt(p)
    return {n: jax.random.uniform(kk, s, jnp.float32, -a, a) for kk, (n, s) in zip(keys, shapes.items())}


def uncertain_tokens(probs: jax.Array, segment_or_valid: jax.Array, threshold: float,
                     max_slots: int) -> jax.Array:
    """GW-MoE uncertain tokens (Wu et al. 2024, §7.1) -> [B,T] bool.

    H = -sum s log(s + 1e-5) (raw, natural log) >= threshold, keeping only the first ``max_slots``
    uncertain tokens per sequence (cumsum mask). ``segment_or_valid`` [B,T]: bool = valid mask, one
    sequence per row; int = packed segment ids (0 = padding), capped per segment. Padding never counts.
    """
    probs = probs.astype(jnp.float32)
    H = -jnp.sum(probs * jnp.log(probs + 1e-5), axis=-1)  # [B,T]
    if segment_or_valid.dtype == jnp.bool_:
        valid, seg = segment_or_valid, jnp.ones(segment_or_valid.shape, jnp.int32)
    else:
        seg = segment_or_valid
        valid = seg != 0
    u = (H >= threshold) & valid
    cum = jnp.cumsum(u.astype(jnp.int32), axis=-1)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=-1)
    base = jax.lax.cummax(jnp.where(start, cum - u.astype(jnp.int32), 0), axis=1)
    return u & (cum - base <= max_slots)


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
    """Switch-style multiplicative noise: x * U[1 - eps, 1 + eps] (same dtype as x)."""
    noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def entropy(probs: jax.Array, log_probs: jax.Array) -> jax.Array:
    """-sum p log p over the last axis, with log p from the logits (log_softmax): finite value and
    gradient where p == 0 (xlogy(p, p) has a NaN gradient there, e.g. MaskMoE-masked experts)."""
    return -jnp.sum(probs * log_probs, axis=-1)


def router_stats(r: Routing | ExpertChoice, valid: jax.Array | None = None, *,
                 num_null: int = 0) -> dict:
    """Per-layer fp32 statistics over valid tokens (valid [T] bool; None = all).

    counts [E] selections per real expert (stop-gradient); prob_mean [E]; z = mean lse(logits)^2;
    entropy = mean -sum p log p; topk_score_sum = mean sum of the selected real experts' probs;
    active_experts = mean real experts per token; dropped = selections lost to caps (top-p slots
    beyond max_slots; expert choice: valid tokens no expert took). z and entropy keep gradients.
    """
    T, E_all = r.probs.shape
    E = E_all - num_null
    v = jnp.ones((T,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    mean = lambda a: jnp.sum(a * v) / n  # noqa: E731  [T] -> scalar
    sel = r.selected[:, :E] * v[:, None]
    probs = r.probs[:, :E]
    if isinstance(r, ExpertChoice):
        dropped = jnp.sum((jnp.sum(r.selected, -1) == 0) * v)
    else:
        dropped = jnp.sum(r.dropped * v)
    return {
        "counts": jax.lax.stop_gradient(jnp.sum(sel, axis=0)),
        "prob_mean": jnp.sum(probs * v[:, None], axis=0) / n,
        "z": mean(jax.nn.logsumexp(r.logits, axis=-1) ** 2),
        "entropy": mean(entropy(r.probs, r.log_probs)),
        "topk_score_sum": mean(jnp.sum(r.selected[:, :E] * probs, axis=-1)),
        "active_experts": jax.lax.stop_gradient(mean(jnp.sum(r.selected[:, :E], axis=-1))),
        "dropped": jax.lax.stop_gradient(dropped),
    }


def update_bias(bias: jax.Array, counts: jax.Array, rate: float, mode: str = "sign") -> jax.Array:
    """DeepSeek-V3 aux-loss-free update (§8.12): b += rate * sign(mean(counts) - counts).

    ``counts`` [E] must be the global selection counts of the optimizer step (all data shards and
    micro-steps). 'sign_centered' subtracts the mean of b afterwards (b stays zero-mean).
    """
    counts = counts.astype(jnp.float32)
    new = bias + rate * jnp.sign(jnp.mean(counts) - counts)
    if mode == "sign_centered":
        new = new - jnp.mean(new)
    elif mode != "sign":
        raise ValueError(f"mode={mode!r}: choose 'sign' or 'sign_centered'")
    return new.astype(bias.dtype)


class RouterBias(nnx.Variable):
    """Aux-loss-free selection bias [E]; not trainable, updated by the loop with ``update_bias``."""


class TokenMask(nnx.Variable):
    """MaskMoE additive mask [V,E]; fixed (may be replaced once from corpus token frequencies)."""


def _variable(cls, value: jax.Array, names: tuple) -> nnx.Variable:
    """A non-Param variable carrying logical axis names, sharded eagerly under a mesh (as ``param``)."""
    if not jax.sharding.get_abstract_mesh().empty:
        return cls(value, out_sharding=names)
    var = cls(value)
    var.set_metadata("out_sharding", names)
    return var


class RecurrentCell(nnx.Module):
    """The RMoE GRU (or tanh RNN) cell shared by all MoE layers: created once by the model (§4.2)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        r = cfg.moe.router
        self.kind = r.recurrent
        for name, v in init_gru_params(rngs.params(), r.recurrent_dim, r.recurrent,
                                       r.recurrent_init, cfg.init_std).items():
            setattr(self, name, param(lambda k, s, d, v=v: v.astype(d), None, v.shape,
                                      jnp.float32, (None,) * v.ndim))

    def cell_params(self) -> dict:
        names = ("w_i", "w_h", "b_i", "b_h") if self.kind == "gru" else ("w_i", "w_h", "b")
        return {n: getattr(self, n)[...].astype(jnp.float32) for n in names}

    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        """x, h [T,p] -> h' [T,p] (fp32)."""
        fn = gru_cell if self.kind == "gru" else rnn_cell
        return fn(self.cell_params(), x.astype(jnp.float32), h.astype(jnp.float32))


class Router(nnx.Module):
    """Router for one MoE layer; dispatches on ``cfg.moe.router.kind`` to the pure functions above.

    Parameters: w [D,E] ('embed', None) (or RMoE proj [D,p] + gate [p,E]), w_null [D,N_null],
    bias [E] (RouterBias), token_mask [V,E] (TokenMask; built at init with no frequencies, i.e.
    the lowest ids are "frequent"; overwrite it with ``maskmoe_mask(freqs, ...)`` for corpus ranks).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m, r = cfg.moe, cfg.moe.router
        self.moe_cfg = m
        D, E, N, p = cfg.d_model, m.num_experts, r.num_null_experts, r.recurrent_dim
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        pd = cfg.param_dtype
        if r.gating == "avg_key":  # EMoE: no router parameters; keys come from the expert gates
            pass
        elif r.recurrent == "none":
            self.w = param(init, rngs.params(), (D, E), pd, ("embed", None))
        else:
            self.proj = param(init, rngs.params(), (D, p), pd, ("embed", None))
            self.gate = param(jax.nn.initializers.truncated_normal(1.0 / math.sqrt(p)),
                              rngs.params(), (p, E), pd, (None, None))
        self.w_null = param(init, rngs.params(), (D, N), pd, ("embed", None)) if N else None
        self.bias = (_variable(RouterBias, jnp.zeros((E,), jnp.float32), (None,))
                     if r.aux_free_bias else None)
        mask = None
        if r.token_mask == "maskmoe":
            mask = _variable(TokenMask, maskmoe_mask(
                None, E, frequent_fraction=r.maskmoe_frequent_fraction,
                frequent_visible=r.maskmoe_frequent_visible, seed=rngs.params(),
                vocab_size=cfg.vocab_size), (None, None))
        self.token_mask = mask

    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None,
                 state: jax.Array | None = None, cell: RecurrentCell | None = None,
                 rng: jax.Array | None = None, train: bool = False,
                 valid: jax.Array | None = None,
                 expert_keys: jax.Array | None = None, forced: jax.Array | None = None):
        """x [T,D] -> (Routing | ExpertChoice, new recurrent state [T,p] or None).

        token_ids [T] (MaskMoE), state [T,p] (RMoE; None = h_0 = 0; read as 0 with
        recurrent_reset), cell: the shared RecurrentCell, rng: jitter noise (train only),
        valid [T] (expert choice: padding takes no slot),
        forced [T,k] int32: routing replay (``forced_route``; kind='topk' only; the aux-free bias
        and MaskMoE masks do not apply).
        """
        m, r = self.moe_cfg, self.moe_cfg.router
        f32 = lambda a: a[...].astype(jnp.float32)  # noqa: E731
        x = x.astype(jnp.float32)
        if train and r.jitter > 0 and rng is not None:
            x = jitter(x, rng, r.jitter)
        new_state = None
        if r.gating == "avg_key":  # EMoE avg-k gating: a_e(x) = x . mean key of block e
            if expert_keys is None:
                raise ValueError("router.gating='avg_key' needs expert_keys [D,E] (the MoE "
                                 "block passes the mean of its current w_gate per expert)")
            logits = jnp.dot(x, expert_keys.astype(jnp.float32), precision=_HI)  # [T,E]
        elif r.recurrent == "none":
            logits = jnp.dot(x, f32(self.w), precision=_HI)  # [T,E]
        else:
            if cell is None:
                raise ValueError("recurrent router: pass the model's shared RecurrentCell as cell=")
            h = (jnp.zeros((x.shape[0], r.recurrent_dim), jnp.float32)
                 if state is None or r.recurrent_reset else state)  # reset: no cross-layer state
            new_state = cell(jnp.dot(x, f32(self.proj), precision=_HI), h)  # [T,p]
            logits = jnp.dot(new_state, f32(self.gate), precision=_HI)
        N = r.num_null_experts
        if N:
            logits = jnp.concatenate([logits, jnp.dot(x, f32(self.w_null), precision=_HI)], -1)
        if forced is not None:
            return self._forced(logits, forced), new_state
        mask = None
        if self.token_mask is not None:
            if token_ids is None:
                raise ValueError("MaskMoE router needs token_ids")
            mask = jnp.take(self.token_mask[...], token_ids, axis=0)  # [T,E]
        if r.kind == "expert_choice":
            if mask is not None:
                logits = logits + mask
            return expert_choice_route(logits, r.expert_choice_capacity, m.top_k, valid), new_state
        if r.kind == "topp":
            if mask is not None:
                logits = logits + jnp.pad(mask, ((0, 0), (0, N)))
            slots = r.max_experts_per_token or (m.num_experts + N)
            return topp_route(logits, r.top_p, slots, num_null=N), new_state
        bias = None if self.bias is None else self.bias[...]
        if r.gating == "avg_key":
            return _unit_weights(topk_route(logits, m.top_k, score="softmax", norm_topk_prob=False,
                                            bias=bias, mask=mask), r.routed_scaling), new_state
        return topk_route(logits, m.top_k, score=r.score, norm_topk_prob=r.norm_topk_prob,
                          routed_scaling=r.routed_scaling, bias=bias, group_mode=r.group_mode,
                          num_groups=r.num_groups, topk_groups=r.topk_groups,
                          group_score=r.group_score, moge_renormalize=r.moge_renormalize,
                          num_null=N, mask=mask, drop_top=r.drop_top_experts), new_state

    def _forced(self, logits: jax.Array, forced: jax.Array) -> Routing:
        """The replayed routing of ``forced`` [T,k] under this router's scoring."""
        r = self.moe_cfg.router
        if r.kind != "topk":
            raise ConfigError(f"model.moe.router.kind={r.kind!r} cannot replay a forced routing "
                              "(routing replay needs kind='topk')")
        if r.gating == "avg_key":
            return _unit_weights(forced_route(logits, forced, norm_topk_prob=False), r.routed_scaling)
        norm = r.moge_renormalize if r.group_mode == "moge" else r.norm_topk_prob
        return forced_route(logits, forced, score=r.score, norm_topk_prob=norm,
                            routed_scaling=r.routed_scaling, num_null=r.num_null_experts)


def _unit_weights(out: Routing, routed_scaling: float) -> Routing:
    """EMoE avg_key gating: every non-empty slot combines with weight routed_scaling (no softmax)."""
    return dataclasses.replace(out, weights=(out.experts >= 0).astype(jnp.float32) * routed_scaling)
