"""Kernel selection: the one place where the config picks an implementation (``xla``, ``cudnn``...).

Models call ``attention(...)`` and ``gmm(...)`` with ``impl`` from the config, so CPU tests run the
same code as production except for the kernel body. ``impl='auto'`` is resolved here, per backend,
and nowhere else in the package looks at the backend to choose a path (``platform.current()``:
jax's default backend, or ``target_platform(...)`` when compiling ahead of time for another).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import gmm as _gmm_impls
from moejax.kernels import platform as _platform
from moejax.kernels import reference
from moejax.kernels.platform import target_platform  # noqa: F401  (re-exported)
from moejax.kernels.reference import attention_mask  # noqa: F401  (re-exported)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def resolve_attention_impl(impl: str, dtype, *, needs_reference: bool = False,
                           self_attention: bool = True, seq_len: int | None = None,
                           backend: str | None = None) -> str:
    """'auto' -> 'splash' on TPU, 'cudnn' on GPU for bf16/fp16, 'xla' (the reference) otherwise.

    'auto' also takes the reference when the call needs it (a softmax sink or probabilities), and
    on TPU when splash cannot take the shape (a KV cache, or a length not a multiple of 128). An
    explicit impl is returned unchanged (its kernel raises if it cannot serve the call)."""
    if impl != "auto":
        return impl
    backend = backend or _platform.current()
    if needs_reference:
        return "xla"
    if backend == "tpu":
        from moejax.kernels import attention_tpu
        return "splash" if attention_tpu.supports(seq_len, self_attention) else "xla"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
              impl: str = "xla", scale: float | None = None, sink_logits: jax.Array | None = None,
              return_stats: bool = False, sample_len: int = 64, self_attention: bool = False):
    """Causal, segment-masked grouped-query attention.

    q: [B,T,H,hd]; k, v: [B,S,Hkv,hd] (H % Hkv == 0); segment ids / positions: [B,T] and [B,S] int32.
    kv is visible to q iff kv_pos <= q_pos, same segment, kv segment != 0; padding queries
    (segment 0) give zeros. Returns [B,T,H,hd] in q's dtype.
    ``self_attention``: q and kv are the same T tokens in order (no KV cache), so positions rise
    along each segment and causality by index equals causality by position: cudnn then runs its
    causal mask (skipping the upper triangle) and splash its causal block mask. Without it, cudnn
    takes the full position mask and splash falls back to the reference.
    ``sink_logits`` [H] adds a learnable softmax sink (zero value); ``return_stats`` also returns
    the probabilities' first-token statistics (see ``reference.attention``). Both need the
    reference path (``impl='xla'``; 'auto' picks it); cudnn and splash raise.
    """
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
              q_positions=q_positions, kv_positions=kv_positions, scale=scale)
    impl = resolve_attention_impl(impl, q.dtype, self_attention=self_attention,
                                  needs_reference=sink_logits is not None or return_stats,
                                  seq_len=q.shape[1] if q.shape[1] == k.shape[1] else None)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is unknown; choose one of {ATTENTION_IMPLS}")
    if impl == "xla":
        return reference.attention(q, k, v, sink_logits=sink_logits, return_stats=return_stats,
                                   sample_len=sample_len, self_attention=self_attention, **kw)
    if sink_logits is not None:
        raise ValueError(f"attention impl={impl!r} has no softmax sink: set "
                         "model.attention.impl='xla' (or 'auto') to use model.attention.sink=True")
    if return_stats:
        raise ValueError(f"attention impl={impl!r} does not expose its probabilities: attention "
                         "probes need impl='xla' (the reference kernel)")
    if impl == "cudnn":
        if _platform.current() != "gpu":
            raise ValueError("model.attention.impl='cudnn' needs a CUDA GPU (the platform here is "
                             f"{_platform.current()!r}); use impl='xla' or 'auto' on CPU/TPU")
        from moejax.kernels import attention_gpu
        return attention_gpu.attention(q, k, v, self_attention=self_attention, **kw)
    if not self_attention:  # KV cache / decode: splash wants q and kv to be the same sequence
        return reference.attention(q, k, v, **kw)
    from moejax.kernels import attention_tpu
    return attention_tpu.attention(q, k, v, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, scale=scale)


GMM_IMPLS = ("auto", "reference", "xla", "blocked", "tokamax", "pallas")
# Note: the function below shadows the submodule attribute ``moejax.kernels.gmm``; reach the kernel
# bodies with ``from moejax.kernels.gmm import xla`` (resolved through sys.modules), not attributes.


def resolve_gmm_impl(impl: str, backend: str | None = None) -> str:
    """The kernel 'auto' stands for on ``backend`` (default: ``platform.current()``); other impls
    pass through.

    cpu  'blocked': ragged_dot lowers to a G x dense masked dot there.
    gpu  'tokamax' when importable, else 'blocked'. jax.lax.ragged_dot measured 4-8 TFLOP/s at
         64-128 experts on an H100 (~1% of peak; ../shared/notes/gpu.md), while a batched einsum
         over equal groups ran 300-675 TFLOP/s and tokamax 150-278: 'blocked' is that batched
         einsum made exact (groups padded to row blocks). Pending the GPU measurement of the
         Pallas kernel (issue 17), which may replace both here.
    tpu  'pallas': gmm_tpu, i.e. tokamax when importable, else megablox (ragged_dot is XLA's
         generic lowering there; megablox is the TPU grouped-matmul kernel).
    """
    if impl != "auto":
        return impl
    backend = backend or _platform.current()
    if backend == "gpu":
        return "tokamax" if _gmm_impls.have_tokamax() else "blocked"
    if backend == "tpu":
        return "pallas"
    return "blocked"


def resolve_blocked_ffn(backend: str | None = None) -> str:
    """How the MoE layer runs its SwiGLU experts on the block layout (gmm impl 'blocked'):
    'loop' on CPU (``expert_loop``: only the live blocks, 2-D dots on sliced weights; one core,
    T=4096, top-2, E=8, D=F=256 fwd+bwd -20%), 'batched' elsewhere (one batched einsum over
    all blocks, ``moe_dispatch.expert_ffn_blocks``: a loop of small dots would starve a GPU)."""
    return "loop" if (backend or _platform.current()) == "cpu" else "batched"


def blocked_ffn_blocking(rows: int, groups: int, backend: str | None = None) -> tuple[int, int]:
    """(row block of the layout, blocks of one expert per dot) for the block-layout experts over
    ``rows`` rows in ``groups`` experts: the loop groups small blocks (``expert_loop.
    loop_blocking``: 64 x 4 at 8192 rows over 8 experts, less padding at the same dot size);
    the batched form takes ``gmm.default_block`` one at a time."""
    from moejax.kernels import expert_loop
    from moejax.kernels.gmm import default_block

    if resolve_blocked_ffn(backend) == "loop":
        return expert_loop.loop_blocking(rows, groups)
    return default_block(rows, groups), 1


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
        preferred_element_type=None) -> jax.Array:
    """Grouped matmul for MoE experts: out[m] = lhs[m] @ rhs[g(m)].

    lhs: [M,K] with rows sorted by group; rhs: [G,K,N]; group_sizes: [G] int32 (sum <= M). Rows past
    sum(group_sizes) come out as zeros. Differentiable in lhs and rhs. Returns [M,N].
    ``impl``: 'auto' (see ``resolve_gmm_impl``), 'reference' (jnp masked loop), 'xla'
    (lax.ragged_dot), 'blocked' (block-padded batched einsum), 'tokamax', 'pallas' (GPU/TPU).
    """
    kw = dict(preferred_element_type=preferred_element_type)
    impl = resolve_gmm_impl(impl)
    if impl == "reference":
        return reference.gmm(lhs, rhs, group_sizes, **kw)
    if impl in ("xla", "blocked", "tokamax", "pallas"):
        return getattr(_gmm_impls, impl)(lhs, rhs, group_sizes, **kw)
    raise ValueError(f"gmm impl={impl!r} is unknown; choose one of {GMM_IMPLS}")
