"""Analytic estimates the AOT report checks the compiled TPU programs against: what one program
computes (``Work``), its per-chip state and activation memory, FLOPs split into matmul / attention
terms, the grouped matmul's row share under balanced routing, and the remat recompute factor.
Pure arithmetic on the config and mesh shape; nothing is compiled here (``moejax.aot`` does)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from moejax.config import Config


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of one global batch, sharded as ``train.global_batch`` shards it."""
    from moejax import train as T
    sh = T.batch_shardings(mesh)
    out = {k: jax.ShapeDtypeStruct((batch_size, seq_len),
                                   jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh[k])
           for k in T.BATCH_KEYS_2D}
    out["domain"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sh["domain"])
    return out


@dataclasses.dataclass(frozen=True)
class Work:
    """What one program computes, for its analytic FLOPs and expected kernels: ``passes``
    forward-equivalents (3: forward + backward; 1: forward) over ``rows`` x ``seq_len`` tokens
    in micro-steps of ``micro_rows``; a rollout (``decode_rows`` > 0) prefills ``rows`` prompts of
    ``seq_len`` tokens over a KV cache, then feeds ``decode_rows`` rows one token at a time for
    up to ``new_tokens`` steps."""

    passes: int
    rows: int
    seq_len: int
    micro_rows: int
    decode_rows: int = 0
    new_tokens: int = 0

    @property
    def rollout(self) -> bool:
        return self.decode_rows > 0


def train_work(cfg: Config) -> Work:
    return Work(3, cfg.train.batch_size, cfg.data.seq_len, cfg.train.micro_batch_size)


def eval_work(cfg: Config) -> Work:
    return Work(1, cfg.train.batch_size, cfg.data.seq_len, cfg.train.micro_batch_size)


def per_chip_bytes(abstract_tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (its own shard of each)."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize  # a PRNG key: its key data's bytes
    return total


def estimate_memory(cfg: Config, mesh: Mesh, abstract_state) -> dict:
    """Analytic per-chip bytes of the train step, by component.

    Exact (``tests/test_aot.py``: within 0.1% and 0.5%): ``arguments`` (each leaf's own shard of
    the state, plus the batch) and ``outputs`` (the new state; donated, it aliases the old one's
    buffers, so only the scalar metrics are new).

    ``temporaries`` is the working set at the step's peak, which the dumped buffer assignment
    places in the backward loop over the scanned layers, at a layer's recompute (remat):
    ``gradients``, the f32 gradient of every parameter's shard (the stack's is that loop's carry;
    plus the accumulated sum under grad_accum); ``weight_copies``, the compute-dtype copies of
    the weights cast once before the loop and kept for the backward, in the forward and the
    transposed layout (= the f32 bytes for bf16 compute); and ``activations``: the residual
    stream saved at every layer boundary under remat (all of a layer's values without it), one
    layer's recomputed values (the MoE layer's EP receive rows at ``ep_buffer_factor``) and the
    fp32 logits with their gradient.

    It is not a prediction of ``memory_analysis()``'s temp, which counts only what the TPU
    compiler leaves in HBM: its memory-space assignment keeps up to ~100 MiB of temporaries in
    on-chip VMEM, chosen by a per-generation cost model; the HBM heap it packs spans 2-4x the
    bytes live at once; and 3-21 MiB more are allocated below the HLO buffer assignment. For the
    small programs of ``tests/test_aot.py`` (12-27 MiB live at the peak) that temp is 0.48-2.3x
    this estimate and up to 3x apart between v5e and v5p (with VMEM placement off,
    ``xla_{vf,gf}_vmem_memory_space_assignment=false``, they agree within 13%). With the state
    dominating (the gated config at d_model 2048: 0.76 GiB of state per chip) the total is
    1.09x / 1.16x the estimate on v5e / v5p and the two generations are 15% apart."""
    m, t = cfg.model, cfg.train
    batch_shards = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    b = t.micro_batch_size // batch_shards  # rows per chip per micro-step
    T, D, act = cfg.data.seq_len, m.d_model, jnp.dtype(m.dtype).itemsize
    a = m.attention
    tensor = mesh.shape.get("tensor", 1)
    ffn = (m.moe.top_k * m.moe.d_expert * max(m.moe.ep_buffer_factor, 1.0)
           + (m.moe.d_shared or m.moe.d_expert * m.moe.num_shared_experts)
           if m.moe.enabled else m.d_ff)
    # one layer's forward values per token: norms/residual (4 D), q,k,v,attn-out, ffn 3x hidden
    layer = b * T * act * (4 * D + (2 * a.num_heads + 2 * a.num_kv_heads) * a.head_dim / tensor
                           + 3 * ffn / tensor)
    saved = m.num_layers * (b * T * D * act if m.remat != "none" else layer)
    logits = 2 * b * T * m.vocab_size * 4 / tensor
    f32_params = per_chip_bytes(abstract_state.params) * 4 // max(
        jnp.dtype(m.param_dtype).itemsize, 1)
    gradients = f32_params * (2 if t.grad_accum > 1 else 1)  # + the accumulated sum
    # compute-dtype casts of the weights, two layouts; none when the compute dtype is the stored one
    weight_copies = (2 * f32_params * act // 4
                     if act < jnp.dtype(m.param_dtype).itemsize else 0)
    args = per_chip_bytes(abstract_state) + per_chip_bytes(
        abstract_batch(mesh, t.batch_size, T))
    activations = saved + layer + logits
    temporaries = gradients + weight_copies + activations
    return {"arguments": args, "outputs": per_chip_bytes(abstract_state),
            "gradients": gradients, "weight_copies": weight_copies, "activations": activations,
            "temporaries": temporaries, "total": args + temporaries}


def analytic_split(cfg: Config, chips: int, work: Work | None = None) -> dict:
    """The analytic FLOPs per chip of a program doing ``work`` (default: the train step; the
    forward-equivalents of ``ModelConfig.flops_per_token``) split into the layers' parameter
    matmuls (2 N_active per token per pass), the LM head (2 V D) and attention (QK^T and PV
    over the causal half). A rollout's decode tokens attend to the prompt and the half of the
    completion before them on average."""
    m, work = cfg.model, work or train_work(cfg)
    per_pass = m.flops_per_token(work.seq_len) / 3.0  # one forward per token
    tokens = work.rows * work.seq_len
    layers = 2.0 * m.num_params(include_embeddings=False, active=True)
    head = 2.0 * m.vocab_size * m.d_model
    attention = tokens * (per_pass - layers - head)
    if work.rollout:  # flops_per_token(2c) / 3 attends to c tokens on average
        steps = work.decode_rows * work.new_tokens
        attention += steps * (m.flops_per_token(2 * work.seq_len + work.new_tokens) / 3.0
                              - layers - head)
        tokens += steps
    return {k: v * work.passes / chips for k, v in
            (("layers", layers * tokens), ("head", head * tokens), ("attention", attention))}


def analytic_flops_per_chip(cfg: Config, chips: int, work: Work | None = None) -> float:
    """6 N_active tokens + attention (``ModelConfig.flops_per_token``) per chip per step for the
    train step; ``work``'s passes and tokens for another program."""
    return sum(analytic_split(cfg, chips, work).values())


def gmm_row_share(cfg: Config, mesh: Mesh, work: Work | None = None) -> float:
    """Share of the grouped-matmul rows that hold tokens when routing is balanced. Dropless EP
    receives into ep*B rows per chip (B = ``moe_ep.buffer_rows``) for a mean load of
    T_local*top_k; megablox's cost estimate counts every row, the kernel visits the filled ones.
    A rollout at its decode steps' share (one token per row; N of them against one prefill)."""
    moe, work = cfg.model.moe, work or train_work(cfg)
    ep = mesh.shape.get("expert", 1)
    if not moe.enabled or ep == 1 or moe.dispatch != "dropless":
        return 1.0
    from moejax.layers.moe_ep import buffer_rows
    shards = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    tokens = work.decode_rows if work.rollout else work.micro_rows * work.seq_len
    assignments = max(tokens // shards, 1) * moe.top_k
    return assignments / (ep * buffer_rows(moe.ep_buffer_factor, assignments, ep))


def remat_factor(cfg: Config, work: Work | None = None) -> float:
    """Compiled / analytic FLOPs to expect from recomputation in a backward pass: full remat
    reruns the forward (4 forward-equivalents instead of 3), 'dots' saves the matmul outputs."""
    work = work or train_work(cfg)
    return 4.0 / 3.0 if cfg.model.remat == "full" and work.passes == 3 else 1.0
