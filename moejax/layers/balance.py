"""Balance losses computed from router statistics, never inside layers (DESIGN "Contracts").

Normalisation (spec §0, §1): ``LBL = E * sum_i f_i p_i`` with ``f_i = counts_i / sum_j counts_j``
(stop-gradient, sums to 1 also for variable-k routers such as top-p or null experts; for top-k it
equals the §0 form counts_i / (K T)) and ``p_i = prob_sum_i / tokens``. E is the number of columns,
i.e. real + null experts for AdaMoE. Uniform f and p give exactly 1. The scope decides over which
tokens f and p are pooled (sequence, group of G sequences, data shard = micro, whole batch = global),
and a scope's loss is the mean of the per-pool losses over pools holding tokens (empty pools are
masked out, never NaN). Every function returns the value without its coefficient.

Inputs come from the MoE layer's aux: ``seq_counts [B,E]`` (stop-gradient selection counts per
sequence), ``seq_prob_sum [B,E]`` (differentiable sum of probs over the sequence's valid tokens),
``seq_tokens [B]``; a leading layer axis ``[L,B,E]`` is allowed and averaged over. A packed row
holds several documents; ``balance.sequence_unit='document'`` (default) makes scope 'sequence' and
the sequence imbalance per document. Documents per row vary, so the layer reduces them itself
(``document_stats``: per-layer scalars ``doc_balance`` and ``doc_imbalance``); 'row' pools the row.

Pooled groups (``shuffled``, and ``group`` larger than a micro-step): each token of the *global*
batch belongs to one of G balance groups (``balance_group_ids``, drawn from the step key), so a
group spans micro-steps. The training loop first counts each group's selections over all
micro-steps (a forward without gradient, ``group_token_pool`` of the layer's token-level
``router/token_selected``), then each micro-step adds its share ``pooled_balance`` of
``mean_g E sum_i f^g_i p^g_i``: exact, since the loss is linear in p once f is fixed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCOPES = ("none", "micro", "sequence", "group", "shuffled", "global", "global+micro")
GROUP_KEY_SALT = 0x6C626C  # fold_in salt of the balance-group draw (micro-steps fold in 0..accum-1)


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b where b > 0, else 0 (b broadcast against a)."""
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def _masked_mean(values: jax.Array, ok: jax.Array) -> jax.Array:
    """Mean of values [..., N] over the entries with ok; 0 if none."""
    ok = ok.astype(jnp.float32)
    return jnp.sum(jnp.where(ok > 0, values, 0.0), -1) / jnp.maximum(jnp.sum(ok, -1), 1.0)


def lbl(counts: jax.Array, prob_sum: jax.Array, tokens: jax.Array) -> jax.Array:
    """E * sum_i f_i p_i for counts, prob_sum [..., E] and tokens [...] -> [...] (0 for no tokens)."""
    counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
    f = _safe_div(counts, jnp.sum(counts, -1, keepdims=True))  # [...,E], sums to 1
    p = _safe_div(prob_sum.astype(jnp.float32), jnp.asarray(tokens, jnp.float32)[..., None])
    return counts.shape[-1] * jnp.sum(f * p, -1)


def _grouped(seq_counts, seq_prob_sum, seq_tokens, group_size: int) -> jax.Array:
    """Mean LBL over consecutive groups of ``group_size`` sequences (pooled counts and probs)."""
    B, E = seq_counts.shape
    if B % group_size:
        raise ValueError(f"balance group of {group_size} sequences must divide the batch ({B})")
    n = B // group_size
    if group_size == 1:
        c, ps, tok = seq_counts, seq_prob_sum, seq_tokens
    else:  # pool with a 0/1 membership matmul: a reshape of a batch-sharded axis is ambiguous
        member = (jnp.arange(B)[None, :] // group_size == jnp.arange(n)[:, None]).astype(jnp.float32)
        pool = lambda a: jnp.einsum("nb,b...->n...", member, a.astype(jnp.float32),  # noqa: E731
                                    precision=jax.lax.Precision.HIGHEST)
        c, ps, tok = pool(seq_counts), pool(seq_prob_sum), pool(seq_tokens)  # [n,E], [n,E], [n]
    return _masked_mean(lbl(c, ps, tok), tok > 0)


def _balance_one(seq_counts, seq_prob_sum, seq_tokens, count_buffer, *, scope, group_size,
                 micro_groups, micro_ratio):
    """balance_loss for one layer: [B,E], [B,E], [B], [E] | None -> (scalar, [E] | None)."""
    B = seq_counts.shape[0]
    seq_tokens = seq_tokens.astype(jnp.float32)

    def micro():
        if B % micro_groups:
            raise ValueError(f"micro_groups={micro_groups} (batch shards) must divide the batch ({B})")
        return _grouped(seq_counts, seq_prob_sum, seq_tokens, B // micro_groups)

    if scope == "none":
        return jnp.zeros((), jnp.float32), count_buffer
    if scope == "sequence":
        return _grouped(seq_counts, seq_prob_sum, seq_tokens, 1), count_buffer
    if scope == "group":
        return _grouped(seq_counts, seq_prob_sum, seq_tokens, group_size), count_buffer
    if scope == "micro":
        return micro(), count_buffer
    if scope in ("global", "global+micro"):
        c = jax.lax.stop_gradient(jnp.sum(seq_counts.astype(jnp.float32), 0))  # [E]
        if count_buffer is not None:
            c = c + count_buffer  # earlier micro-steps of this optimizer step (§1.1)
        loss = lbl(c, jnp.sum(seq_prob_sum, 0), jnp.sum(seq_tokens))
        if scope == "global+micro":
            loss = loss + micro_ratio * micro()
        return loss, c
    raise ValueError(f"scope={scope!r}: choose one of {SCOPES}")


class PooledGroups(NamedTuple):
    """One micro-step's view of the pooled balance groups: ``ids`` [b,T] int32 (this micro-step's
    tokens), ``counts`` [L,G,E_all] (selections of each group over the whole global batch),
    ``tokens`` [G] (valid tokens per group over the global batch), ``micro_steps`` (accumulation
    steps: the loop averages aux losses over them, so each step's share is scaled back up)."""

    ids: jax.Array
    counts: jax.Array
    tokens: jax.Array
    micro_steps: int


def num_pooled_groups(scope: str, group_size: int, rows: int, micro_steps: int,
                      batch_shards: int) -> int:
    """G balance groups of the global batch (``rows`` sequences) pooled across micro-steps, or 0
    when the scope is computed inside each micro-step. 'shuffled': one group per micro-batch
    (micro_steps x batch_shards of them, each the token count of a micro-batch); 'group' whose
    ``group_size`` exceeds a micro-step's rows: rows / group_size groups of consecutive rows."""
    if scope == "shuffled":
        return micro_steps * batch_shards
    if scope == "group" and group_size > rows // micro_steps:
        if rows % group_size:
            raise ValueError(f"balance group of {group_size} sequences must divide the global "
                             f"batch ({rows} sequences)")
        return rows // group_size
    return 0


def shuffled_group_ids(key: jax.Array, rows: int, seq_len: int, num_groups: int) -> jax.Array:
    """A uniformly random partition of the global batch's token positions into ``num_groups``
    groups of equal size (token level, across sequences) -> [rows, seq_len] int32 group ids."""
    n = rows * seq_len
    if n % num_groups:
        raise ValueError(f"{num_groups} shuffled balance groups must divide the {n} tokens")
    perm = jax.random.permutation(key, n)  # position perm[j] goes to group j // (n / G)
    group_of_slot = jnp.arange(n, dtype=jnp.int32) // (n // num_groups)
    ids = jnp.zeros((n,), jnp.int32).at[perm].set(group_of_slot)
    return ids.reshape(rows, seq_len)


def balance_group_ids(scope: str, key: jax.Array, rows: int, seq_len: int,
                      num_groups: int) -> jax.Array:
    """Group id [rows, seq_len] of every global-batch token for a pooled scope: random token
    groups ('shuffled', fresh per step from ``key``) or consecutive rows ('group')."""
    if scope == "shuffled":
        return shuffled_group_ids(key, rows, seq_len, num_groups)
    row = jnp.arange(rows, dtype=jnp.int32) // (rows // num_groups)
    return jnp.broadcast_to(row[:, None], (rows, seq_len))


def group_token_pool(values: jax.Array, ids: jax.Array, num_groups: int) -> jax.Array:
    """Sum token values [..., b, T, E] per group of ids [b, T] -> [..., G, E] (a one-hot matmul,
    so a batch-sharded token axis reduces with one all-reduce)."""
    member = jax.nn.one_hot(ids, num_groups, dtype=jnp.float32)  # [b,T,G]
    return jnp.einsum("btg,...bte->...ge", member, values.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def pooled_balance(token_probs: jax.Array, pooled: PooledGroups) -> jax.Array:
    """This micro-step's share of the pooled-group LBL (mean over layers and non-empty groups of
    E sum_i f^g_i p^g_i, f^g from the global ``pooled.counts``); token_probs [L,b,T,E] (zero at
    padding). The shares of all micro-steps sum to the loss."""
    ps = group_token_pool(token_probs, pooled.ids, pooled.counts.shape[-2])  # [L,G,E]
    per = lbl(pooled.counts, ps, pooled.tokens)  # [L,G]
    return jnp.mean(_masked_mean(per, pooled.tokens > 0))


def balance_loss(seq_counts: jax.Array, seq_prob_sum: jax.Array, seq_tokens: jax.Array, *,
                 scope: str, group_size: int = 1, micro_groups: int = 1,
                 count_buffer: jax.Array | None = None, micro_ratio: float = 0.01):
    """Load-balancing loss of one scope -> (loss scalar, new count buffer or the one passed).

    seq_counts, seq_prob_sum [B,E] or [L,B,E]; seq_tokens [B] or [L,B]; count_buffer [E] / [L,E].
    * 'sequence': mean over sequences (DeepSeek-V3 sequence-wise loss, §8.12).
    * 'group': consecutive groups of ``group_size`` sequences, pooled, mean over groups (§1.4).
    * 'micro': 'group' with group_size = B / micro_groups, one group per data shard (§1.1 micro).
    * 'global': pooled over the batch; with gradient accumulation pass the buffer returned by the
      previous micro-step (zeros / None at the first), and f uses buffer + this step's counts while
      p stays local (§1.1 approximate global-batch LBL). No token buffer is needed: f divides by the
      pooled count total, which is K * tokens seen for top-k. The returned buffer is the new total.
    * 'global+micro': global + micro_ratio * micro (Qwen's efficiency add-on).
    The loss is averaged over a leading layer axis.
    """
    kw = dict(scope=scope, group_size=group_size, micro_groups=micro_groups, micro_ratio=micro_ratio)
    if seq_counts.ndim == 2:
        return _balance_one(seq_counts, seq_prob_sum, seq_tokens, count_buffer, **kw)
    fn = lambda c, p, t, b: _balance_one(c, p, t, b, **kw)  # noqa: E731
    loss, buf = jax.vmap(fn, in_axes=(0, 0, 0, None if count_buffer is None else 0))(
        seq_counts, seq_prob_sum, seq_tokens, count_buffer)
    return jnp.mean(loss), buf


def z_loss(z_per_layer: jax.Array) -> jax.Array:
    """Router z-loss (ST-MoE): mean over layers of the per-layer mean logsumexp(logits)^2."""
    return jnp.mean(jnp.asarray(z_per_layer, jnp.float32))


def entropy_loss(entropy_per_layer: jax.Array) -> jax.Array:
    """Top-p dynamic loss (Huang et al. 2024, §8.5): mean router entropy -sum P log P, minimised."""
    return jnp.mean(jnp.asarray(entropy_per_layer, jnp.float32))


def device_balance_loss(counts: jax.Array, prob_sum: jax.Array, tokens: jax.Array,
                        num_groups: int) -> jax.Array:
    """DeepSeekMoE device-level balance (§8.6), mean over any leading (layer) axes.

    Experts split into ``num_groups`` consecutive groups d. f_i = E * counts_i / sum counts (1 at
    balance, DeepSeek's N'/(K'T) form), f'_d = mean_{i in d} f_i, P_i = prob_sum_i / tokens,
    P'_d = sum_{i in d} P_i; loss = sum_d f'_d P'_d, exactly 1 at perfect balance.
    counts, prob_sum [..., E]; tokens [...].
    """
    E = counts.shape[-1]
    if E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the experts ({E})")
    counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
    f = E * _safe_div(counts, jnp.sum(counts, -1, keepdims=True))
    P = _safe_div(prob_sum.astype(jnp.float32), jnp.asarray(tokens, jnp.float32)[..., None])
    shape = counts.shape[:-1] + (num_groups, E // num_groups)
    fd = jnp.mean(f.reshape(shape), -1)
    Pd = jnp.sum(P.reshape(shape), -1)
    return jnp.mean(jnp.sum(fd * Pd, -1))


def imbalance(counts: jax.Array) -> jax.Array:
    """Max load / mean load over the last (expert) axis: counts [..., E] -> [...]; 1 = balanced."""
    counts = counts.astype(jnp.float32)
    return _safe_div(jnp.max(counts, -1), jnp.mean(counts, -1))


def document_ids(segment_ids: jax.Array) -> jax.Array:
    """[B,T] segment ids -> [B,T] int32 index of each token's document within its row (0, 1, ...):
    a new document starts at position 0 and wherever the segment id changes."""
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(start.astype(jnp.int32), axis=1) - 1


def document_stats(selected: jax.Array, probs: jax.Array, segment_ids: jax.Array, *,
                   num_real: int) -> dict:
    """Per-document balance of one layer: selected, probs [B*T, E_all]; segment_ids [B,T] (0 =
    padding) -> {'doc_balance': mean over documents of lbl (differentiable through probs),
    'doc_imbalance': mean over documents with selections of max/mean load of the real experts}."""
    B, T = segment_ids.shape
    doc = document_ids(segment_ids)  # [B,T]
    v = (segment_ids != 0).astype(jnp.float32)  # [B,T]
    per_doc = jax.vmap(lambda a, d: jax.ops.segment_sum(a, d, num_segments=T))  # [B,T,X]->[B,T,X]
    counts = jax.lax.stop_gradient(per_doc(selected.reshape(B, T, -1) * v[..., None], doc))
    prob_sum = per_doc(probs.reshape(B, T, -1).astype(jnp.float32) * v[..., None], doc)
    tokens = per_doc(v[..., None], doc)[..., 0]  # [B,T] (documents; unused ids hold 0)
    real = counts[..., :num_real]
    return {"doc_balance": _masked_mean(lbl(counts, prob_sum, tokens).reshape(-1),
                                        tokens.reshape(-1) > 0),
            "doc_imbalance": jax.lax.stop_gradient(_masked_mean(
                imbalance(real).reshape(-1), jnp.sum(real, -1).reshape(-1) > 0))}


def _switched(global_loss, step, switch_step: int, micro_loss):
    """balance.switch_step: the micro loss before optimizer step ``switch_step``, global after."""
    if step is None:
        raise ValueError("balance.switch_step needs the optimizer step (moe_aux_loss(step=...))")
    return jnp.where(step < switch_step, micro_loss, global_loss)


def needs_token_stats(balance_cfg) -> bool:
    """Whether the MoE layer reports token-level selections and probabilities (pooled scopes)."""
    return balance_cfg.scope in ("shuffled", "group")


def sequence_imbalance(seq_counts: jax.Array) -> jax.Array:
    """Mean over sequences (with selections) of per-sequence max/mean load: [..., B, E] -> [...]."""
    per = imbalance(seq_counts)  # [...,B]
    return _masked_mean(per, jnp.sum(seq_counts, -1) > 0)


STAT_KEYS = ("aux_loss", "balance_loss", "z_loss", "device_loss", "entropy_loss",
             "sparsity_loss")
LAYER_STAT_KEYS = ("seq_imbalance", "topk_score_sum", "entropy", "active_experts", "dropped")


def zero_stats(num_layers: int, num_columns: int) -> dict:
    """The (fixed) structure of ``moe_aux_loss``'s stats, zeroed: a scan carry for grad accumulation."""
    return {"counts": jnp.zeros((num_layers, num_columns), jnp.float32),
            **{k: jnp.zeros((), jnp.float32) for k in STAT_KEYS},
            **{k: jnp.zeros((num_layers,), jnp.float32) for k in LAYER_STAT_KEYS}}


def moe_aux_loss(aux: dict, moe, *, micro_groups: int, count_buffer: jax.Array | None = None,
                 step: jax.Array | None = None, pooled: PooledGroups | None = None):
    """All MoE aux losses of one (micro-)step from the model's aux -> (loss, buffer, stats).

    Reads ``router/seq_counts``, ``router/seq_prob_sum`` [L,B,E_all], ``router/seq_tokens`` [L,B],
    ``router/z`` and ``router/entropy`` [L], and with ``balance.sequence_unit='document'``
    ``router/doc_balance`` and ``router/doc_imbalance`` [L]; ``moe`` is the MoEConfig.
    loss = coef * balance (scope from the config; 'sequence' per document or per row, see
    ``balance.sequence_unit``) + z_loss_coef * z + device_coef * device balance (real experts,
    router.num_groups groups) + entropy_coef * entropy (kind='topp' only) + dsmoe_sparsity_coef *
    the mean over layers of ``router/sparsity`` (variant 'dsmoe' only, DSMoE's L_s).
    stats (stop-gradient) follow ``zero_stats``:
    counts [L,E_all] of this step's batch and each unscaled loss term.
    Pooled scopes ('shuffled', 'group' across micro-steps) need ``pooled`` and
    ``router/token_probs`` [L,b,T,E_all]; ``balance.switch_step`` needs the optimizer ``step``.
    """
    b, r = moe.balance, moe.router
    sc, ps, tok = aux["router/seq_counts"], aux["router/seq_prob_sum"], aux["router/seq_tokens"]
    zero = jnp.zeros((), jnp.float32)
    bal, buf = zero, count_buffer
    per_document = b.sequence_unit == "document"
    if b.scope == "sequence" and per_document and b.coef > 0:
        bal = jnp.mean(aux["router/doc_balance"])
    elif pooled is not None and b.coef > 0:
        bal = pooled.micro_steps * pooled_balance(aux["router/token_probs"], pooled)
    elif b.scope == "shuffled" and b.coef > 0:
        raise ValueError("balance.scope='shuffled' pools across micro-steps: pass pooled=")
    elif b.scope != "none" and b.coef > 0:
        bal, buf = balance_loss(sc, ps, tok, scope=b.scope, group_size=b.group_size,
                                micro_groups=micro_groups, count_buffer=count_buffer,
                                micro_ratio=b.micro_ratio)
        if b.switch_step:
            bal = _switched(bal, step, b.switch_step, balance_loss(
                sc, ps, tok, scope="micro", micro_groups=micro_groups)[0])
    zl = z_loss(aux["router/z"]) if b.z_loss_coef > 0 else zero
    dev = zero
    if b.device_coef > 0 and r.num_groups > 1:
        E = moe.num_experts
        dev = device_balance_loss(jnp.sum(sc[..., :E], -2), jnp.sum(ps[..., :E], -2),
                                  jnp.sum(tok, -1), r.num_groups)
    ent = entropy_loss(aux["router/entropy"]) if r.kind == "topp" and b.entropy_coef > 0 else zero
    v = moe.variant
    sparse = jnp.mean(aux["router/sparsity"]) if v.kind == "dsmoe" else zero  # DSMoE L_s (8.7)
    loss = (b.coef * bal + b.z_loss_coef * zl + b.device_coef * dev + b.entropy_coef * ent
            + v.dsmoe_sparsity_coef * sparse)
    seq_imb = (aux["router/doc_imbalance"] if per_document
               else sequence_imbalance(sc[..., :moe.num_experts]))
    per_layer = {"seq_imbalance": seq_imb,
                 **{k: aux[f"router/{k}"] for k in LAYER_STAT_KEYS[1:]}}
    stats = {"counts": jnp.sum(sc, -2).astype(jnp.float32),
             **dict(zip(STAT_KEYS, (loss, bal, zl, dev, ent, sparse))),
             **{k: v.astype(jnp.float32) for k, v in per_layer.items()}}
    return loss, buf, jax.lax.stop_gradient(stats)
