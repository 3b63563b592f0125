"""Shared test helpers: tiny fixed-shape configs and tolerance table (tests reuse compiled programs)."""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax.config import AttentionConfig, Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

# fp32 tolerances: (rtol, atol)
TOL_FP32 = (1e-5, 1e-5)
TOL_SHARDED_FP32 = (2e-5, 2e-5)  # reduction order differs across shardings

BATCH, SEQ = 8, 64


def tiny_model(**kw) -> ModelConfig:
    """2 layers, d=64, 4 query heads over 2 kv heads, fp32 compute: fast and exact enough to compare."""
    attn = dict(num_heads=4, num_kv_heads=2, head_dim=16)
    attn.update(kw.pop("attention", {}))
    base = dict(vocab_size=288, d_model=64, num_layers=2, d_ff=128, max_seq_len=128,
                dtype="float32", attention=AttentionConfig(**attn))
    base.update(kw)
    return ModelConfig(**base)


def tiny_config(mesh: MeshConfig | None = None, **sections) -> Config:
    """A whole tiny run; ``sections`` may override model/data/train with dicts of fields."""
    model = tiny_model(**sections.pop("model", {}))
    data = DataConfig(**{"seq_len": SEQ, "corpus_bytes_per_domain": 300_000, **sections.pop("data", {})})
    train = TrainConfig(**{"steps": 20, "batch_size": BATCH, "warmup_steps": 2, "lr": 3e-3,
                           "log_every": 1, "eval_every": 10, "eval_batches": 1, "ckpt_every": 10,
                           "async_ckpt": False, **sections.pop("train", {})})
    assert not sections, f"unknown sections {list(sections)}"
    return Config(model=model, mesh=mesh or MeshConfig(), data=data, train=train)


PROBE_TOKENS = np.random.RandomState(0).randint(0, 288, (2, 16))  # within tiny_model's vocab


def setup_for(model: ModelConfig, mesh: MeshConfig = MeshConfig(data=1), devices: int = 1):
    """``train.Setup`` of a tiny run around ``model`` on the first ``devices`` devices."""
    import jax

    from moejax import train
    from moejax.mesh import make_mesh
    cfg = Config(model=model, mesh=mesh, data=DataConfig(seq_len=64),
                 train=TrainConfig(steps=10, batch_size=8, warmup_steps=1))
    return train.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))


def logits_of(setup, state, tokens=PROBE_TOKENS):
    """fp32 logits of ``state``'s model on ``tokens`` (one jitted forward) as numpy."""
    import jax
    return np.asarray(jax.jit(lambda st: setup.model(st)(tokens)[0])(state))


def documents_np(seg):
    """[(row, positions)] of every document: maximal runs of one non-zero segment id (a loop),
    the by-hand reference for per-document (packed-row) statistics."""
    docs = []
    for b, row in enumerate(seg):
        t = 0
        while t < len(row):
            u = t
            while u < len(row) and row[u] == row[t]:
                u += 1
            if row[t] != 0:
                docs.append((b, np.arange(t, u)))
            t = u
    return docs


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def gradients_then_sgd(setup, state, batch, steps: int, lr: float) -> dict:
    """Loss, raw gradients and statistics at ``state`` from one jitted gradient program, then the
    losses of ``steps`` plain SGD steps run by that same program (tests that only need "the loss
    falls" compile no optimizer step). ``batch``: global arrays on the setup's mesh."""
    import dataclasses as dc

    import jax

    from moejax import train
    grad_fn = jax.jit(train.make_grad_fn(setup, 1))
    loss, grads, sums = out = jax.device_get(grad_fn(state, batch))
    losses = [float(loss)]
    for _ in range(steps):
        params = jax.tree.map(lambda p, g: p - lr * g, jax.device_get(state.params), out[1])
        state = dc.replace(state, params=jax.device_put(params, setup.state_shardings.params))
        out = jax.device_get(grad_fn(state, batch))
        losses.append(float(out[0]))
    return dict(loss=loss, grads=grads, sums=sums, losses=losses)
