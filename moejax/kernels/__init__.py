"""Kernel selection: the one place where the config picks an implementation (``xla``, ``cudnn``...).

Models call ``attention(...)`` and ``gmm(...)`` with ``impl`` from the config, so CPU tests run the
same code as production except for the kernel body.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import gmm as _gmm_impls
from moejax.kernels import reference
from moejax.kernels.reference import attention_mask

ATTENTION_IMPLS = ("xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
              impl: str = "xla", scale: float | None = None, sink_logits: jax.Array | None = None,
              return_stats: bool = False, sample_len: int = 64):
    """Causal, segment-masked grouped-query attention.

    q: [B,T,H,hd]; k, v: [B,S,Hkv,hd] (H % Hkv == 0); segment ids / positions: [B,T] and [B,S] int32.
    kv is visible to q iff kv_pos <= q_pos, same segment, kv segment != 0; padding queries
    (segment 0) give zeros. Returns [B,T,H,hd] in q's dtype.
    ``sink_logits`` [H] adds a learnable softmax sink (zero value); ``return_stats`` also returns
    the probabilities' first-token statistics (see ``reference.attention``). Both need the
    reference path (``impl='xla'``); cudnn raises.
    """
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
              q_positions=q_positions, kv_positions=kv_positions, scale=scale)
    if impl == "xla":
        return reference.attention(q, k, v, sink_logits=sink_logits, return_stats=return_stats,
                                   sample_len=sample_len, **kw)
    if impl == "cudnn":
        if sink_logits is not None:
            raise ValueError("attention impl='cudnn' has no softmax sink: set "
                             "model.attention.impl='xla' to use model.attention.sink=True")
        if return_stats:
            raise ValueError("attention impl='cudnn' does not expose its probabilities: attention "
                             "probes need impl='xla' (the reference kernel)")
        return _cudnn_attention(q, k, v, **kw)
    raise ValueError(f"attention impl={impl!r} is unknown; choose one of {ATTENTION_IMPLS}")


def _cudnn_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale):
    if jax.default_backend() != "gpu":
        raise ValueError("model.attention.impl='cudnn' needs a CUDA GPU (the default backend is "
                         f"{jax.default_backend()!r}); use impl='xla' on CPU/TPU")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention.impl='cudnn' needs bfloat16/float16 compute, got {q.dtype};"
                         " set model.dtype='bfloat16' or use impl='xla'")
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)  # [B,T,S]
    neg = float(jnp.finfo(q.dtype).min) / 2  # finite in fp16 too
    bias = jnp.where(mask, 0.0, neg)[:, None].astype(q.dtype)  # [B,1,T,S]
    hd = q.shape[-1]
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5 if scale is None else scale,
                                       implementation="cudnn")
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


GMM_IMPLS = ("auto", "reference", "xla", "blocked", "tokamax", "pallas")
# Note: the function below shadows the submodule attribute ``moejax.kernels.gmm``; reach the kernel
# bodies with ``from moejax.kernels.gmm import xla`` (resolved through sys.modules), not attributes.


def resolve_gmm_impl(impl: str) -> str:
    """'auto' -> 'blocked' on CPU (ragged_dot is a G x dense dot there), 'xla' elsewhere."""
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "xla"
    return impl


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
        preferred_element_type=None) -> jax.Array:
    """Grouped matmul for MoE experts: out[m] = lhs[m] @ rhs[g(m)].

    lhs: [M,K] with rows sorted by group; rhs: [G,K,N]; group_sizes: [G] int32 (sum <= M). Rows past
    sum(group_sizes) come out as zeros. Differentiable in lhs and rhs. Returns [M,N].
    ``impl``: 'auto' (blocked on CPU, xla elsewhere), 'reference' (jnp masked loop), 'xla'
    (lax.ragged_dot), 'blocked' (block-sparse jnp, fast on CPU), 'tokamax', 'pallas' (GPU/TPU).
    """
    kw = dict(preferred_element_type=preferred_element_type)
    impl = resolve_gmm_impl(impl)
    if impl == "reference":
        return reference.gmm(lhs, rhs, group_sizes, **kw)
    if impl in ("xla", "blocked", "tokamax", "pallas"):
        return getattr(_gmm_impls, impl)(lhs, rhs, group_sizes, **kw)
    raise ValueError(f"gmm impl={impl!r} is unknown; choose one of {GMM_IMPLS}")
