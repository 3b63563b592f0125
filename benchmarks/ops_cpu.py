"""Per-op CPU times: XLA (jit, fp32) vs torch (fp32, eager) on the dense step's exact shapes.

Splits the one-core dense step ratio of ``benchmarks.step`` into its ops, so the gap can be
attributed to XLA:CPU's dot kernels (the same [M,K]x[K,N] matmul timed on both sides) or to what
moejax controls (the attention formulation, norms, elementwise fusions, the optimizer).
Shapes: the ``dense`` config of ``benchmarks.step`` (batch 16 x 256 tokens, d 256, 4/2 heads of
64, d_ff 768, vocab 320 tied, 4 layers). Each op is timed as peer (torch, as HF computes it) and
ours (moejax's own functions under ``jax.jit``), interleaved, median process-CPU time per call;
``count`` is how often the op runs per train step, so count x time sums to a per-step estimate.
That estimate is compared with the two full steps, timed (interleaved) in two fresh processes:
glibc malloc as it comes, and with ``keep_freed_memory`` (XLA:CPU maps the step's one large
temp buffer fresh every step otherwise; the user/system CPU and page faults per step show it).

    python -m benchmarks.ops_cpu --out benchmarks/ops_cpu.json     # pins itself to one core

The process pins itself to one CPU before jax/torch start (as ``taskset -c 0`` does for
``benchmarks.step``'s one-core mode) and sets torch to one intra-op thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

B, T, D, H, HKV, HD, F, V, L = 16, 256, 256, 4, 2, 64, 768, 320, 4
M = B * T  # tokens per step


def pin_one_core(cpu: int) -> None:
    """Restrict this process (and XLA's thread pool, sized from the affinity) to one CPU."""
    os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------- timing

def time_pair(peer: Callable[[], None], ours: Callable[[], None], *, reps: int,
              target_s: float) -> dict:
    """Median process-CPU and wall seconds per call of each side: warm up, size a repetition
    to ~target_s, then ``reps`` repetitions alternating which side goes first."""
    calls = {}
    for name, fn in (("peer", peer), ("ours", ours)):
        fn(), fn()
        t0 = time.process_time()
        fn()
        calls[name] = max(1, int(target_s / max(time.process_time() - t0, 1e-5)))
    out = {"peer": {"cpu": [], "wall": []}, "ours": {"cpu": [], "wall": []}}
    for r in range(reps):
        for name in (("peer", "ours") if r % 2 == 0 else ("ours", "peer")):
            fn, n = (peer, ours)[name == "ours"], calls[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            out[name]["wall"].append((time.perf_counter() - t0) / n)
            out[name]["cpu"].append((time.process_time() - c0) / n)
    return {k: {"cpu_ms": 1e3 * statistics.median(v["cpu"]),
                "wall_ms": 1e3 * statistics.median(v["wall"])} for k, v in out.items()}


# ---------------------------------------------------------------- op builders
# Each returns (peer callable, ours callable); both compute the same thing on the same shapes.

def _jax_call(fn, *args):
    import jax
    f = jax.jit(fn)
    return lambda: jax.block_until_ready(f(*args))


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def matmul_ops(rng, K: int, N: int) -> dict[str, tuple]:
    """The three matmuls of y = x W on [M,K] x [K,N]: forward, dX = g W^T, dW = x^T g.
    torch uses nn.Linear's layout (W stored [N,K]: F.linear, then g @ W and g^T @ x), XLA the
    dot_generals autodiff emits for ``layers.mlp.linear``."""
    import jax
    import jax.numpy as jnp
    import torch
    x, w, g = _rand(rng, M, K), _rand(rng, K, N), _rand(rng, M, N)
    tx, tw, tg = torch.from_numpy(x), torch.from_numpy(w.T.copy()), torch.from_numpy(g)
    jx, jw, jg = (jnp.asarray(a) for a in (x, w, g))
    dg = jax.lax.dot_general

    def nograd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run
    return {
        "fwd": (nograd(lambda: torch.nn.functional.linear(tx, tw)), _jax_call(jnp.dot, jx, jw)),
        "dX": (nograd(lambda: tg @ tw),
               _jax_call(lambda g, w: dg(g, w, (((1,), (1,)), ((), ()))), jg, jw)),
        "dW": (nograd(lambda: tg.t() @ tx),
               _jax_call(lambda x, g: dg(x, g, (((0,), (0,)), ((), ()))), jx, jg)),
    }


def _torch_fwd_bwd(fn, inputs: list, ct):
    """A callable running fn(*inputs).backward(ct) (inputs are leaf tensors needing grad)."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(ct) if ct is not None else out.backward()
    return run


def _jax_fwd_bwd(fn, args: tuple, ct):
    """A jitted callable returning the VJP of fn at args for cotangent ct (all grads)."""
    import jax

    def fwd_bwd(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)
    return _jax_call(fwd_bwd, args, ct)


def attention_ops(rng) -> dict[str, tuple]:
    """Attention core (scores, causal softmax, PV) fwd+bwd from [B,T,H,hd] q and [B,T,Hkv,hd]
    k, v: torch as HF's sdpa path calls it (transpose to [B,H,T,hd], is_causal, enable_gqa, and
    back), ours as ``kernels.attention(impl='xla')`` in the layer (causal blocks) and the dense
    reference (the full [B,Hkv,G,T,T] scores)."""
    import jax.numpy as jnp
    import torch

    from moejax.kernels import reference
    q, k, v, ct = _rand(rng, B, T, H, HD), _rand(rng, B, T, HKV, HD), _rand(rng, B, T, HKV, HD), \
        _rand(rng, B, T, H, HD)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    tct = torch.from_numpy(ct)

    def sdpa(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=True)
        return o.transpose(1, 2)
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    args = tuple(jnp.asarray(a) for a in (q, k, v))
    peer = _torch_fwd_bwd(sdpa, [tq, tk, tv], tct)
    ops = {}
    for name, self_attention in (("attention core (layer path)", True),
                                 ("attention core (dense reference)", False)):
        def fn(q, k, v, _sa=self_attention):
            return reference.attention(q, k, v, self_attention=_sa, **kw)
        ops[name] = (peer, _jax_fwd_bwd(fn, args, jnp.asarray(ct)))
    return ops


def attention_dot_ops(rng) -> dict[str, tuple]:
    """The attention's two batched matmuls alone at the unblocked size, head-major
    [B*Hkv batches]: QK^T [G*T,hd]x[hd,T] and PV [G*T,T]x[T,hd] (torch.matmul vs XLA dot_general):
    how fast each side's batched dot kernel is on the attention's shapes (not summed per step)."""
    import jax
    import jax.numpy as jnp
    import torch
    G = H // HKV
    n = B * HKV
    q, k, p = _rand(rng, n, G * T, HD), _rand(rng, n, T, HD), _rand(rng, n, G * T, T)
    tq, tk, tp = (torch.from_numpy(a) for a in (q, k, p))
    dg = jax.lax.dot_general
    jq, jk, jp = (jnp.asarray(a) for a in (q, k, p))
    qk = _jax_call(lambda q, k: dg(q, k, (((2,), (2,)), ((0,), (0,)))), jq, jk)
    pv = _jax_call(lambda p, v: dg(p, v, (((2,), (1,)), ((0,), (0,)))), jp, jk)
    return {"QK^T": (lambda: torch.matmul(tq, tk.transpose(1, 2)), qk),
            "PV": (lambda: torch.matmul(tp, tk), pv)}


def norm_op(rng, shape: tuple) -> tuple:
    """RMSNorm (fp32 statistics, learned scale) fwd+bwd over the last axis of ``shape``:
    HF's Qwen3RMSNorm vs ``layers.norms.rms_norm``."""
    import jax.numpy as jnp
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from moejax.layers.norms import rms_norm
    x, s, ct = _rand(rng, *shape), 1 + 0.1 * _rand(rng, shape[-1]), _rand(rng, *shape)
    mod = Qwen3RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(s))
    tx = torch.from_numpy(x).requires_grad_()
    peer = _torch_fwd_bwd(lambda x: mod(x), [tx], torch.from_numpy(ct))
    mod.weight.grad = None
    ours = _jax_fwd_bwd(lambda x, s: rms_norm(x, s, eps=1e-6), (jnp.asarray(x), jnp.asarray(s)),
                        jnp.asarray(ct))
    return peer, ours


def swiglu_op(rng) -> tuple:
    """silu(gate) * up on [M,F] fwd+bwd (the MLP's elementwise part)."""
    import jax
    import jax.numpy as jnp
    import torch
    g, u, ct = _rand(rng, M, F), _rand(rng, M, F), _rand(rng, M, F)
    tg, tu = torch.from_numpy(g).requires_grad_(), torch.from_numpy(u).requires_grad_()
    peer = _torch_fwd_bwd(lambda g, u: torch.nn.functional.silu(g) * u, [tg, tu],
                          torch.from_numpy(ct))
    ours = _jax_fwd_bwd(lambda g, u: jax.nn.silu(g) * u, (jnp.asarray(g), jnp.asarray(u)),
                        jnp.asarray(ct))
    return peer, ours


def rope_op(rng) -> tuple:
    """RoPE on q [B,T,H,hd] and k [B,T,Hkv,hd] fwd+bwd: HF's apply_rotary_pos_emb (cos/sin from
    its rotary embedding, [B,H,T,hd] layout as HF applies it) vs ``layers.embed.apply_rope``."""
    import jax.numpy as jnp
    import torch
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    from moejax.layers.embed import apply_rope, rope_inv_freq
    q, k = _rand(rng, B, T, H, HD), _rand(rng, B, T, HKV, HD)
    cq, ck = _rand(rng, B, T, H, HD), _rand(rng, B, T, HKV, HD)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    ang = pos[..., None].astype(np.float32) * np.asarray(rope_inv_freq(HD, 1e6))  # [B,T,hd/2]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = torch.from_numpy(np.cos(emb)), torch.from_numpy(np.sin(emb))
    tq, tk = torch.from_numpy(q).requires_grad_(), torch.from_numpy(k).requires_grad_()

    def hf(q, k):
        qo, ko = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    def peer():
        tq.grad = tk.grad = None
        qo, ko = hf(tq, tk)
        torch.autograd.backward([qo, ko], [torch.from_numpy(cq), torch.from_numpy(ck)])
    jpos = jnp.asarray(pos)

    def ours_fn(q, k):
        return (apply_rope(q, jpos, rotary_dim=HD, theta=1e6),
                apply_rope(k, jpos, rotary_dim=HD, theta=1e6))
    ours = _jax_fwd_bwd(ours_fn, (jnp.asarray(q), jnp.asarray(k)),
                        (jnp.asarray(cq), jnp.asarray(ck)))
    return peer, ours


def lm_head_ce_op(rng) -> tuple:
    """Tied LM head h E^T ([M,D] x [D,V]) + mean cross entropy, fwd+bwd (grads of h and E)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    h, e = _rand(rng, M, D), 0.02 * _rand(rng, V, D)
    y = rng.integers(0, V, (M,))
    th, te = torch.from_numpy(h).requires_grad_(), torch.from_numpy(e).requires_grad_()
    ty = torch.from_numpy(y).long()
    peer = _torch_fwd_bwd(
        lambda h, e: torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, e).float(),
                                                       ty), [th, te], None)
    jy = jnp.asarray(y, jnp.int32)

    def loss(h, e):
        logits = jax.lax.dot_general(h, e, (((1,), (1,)), ((), ())))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jy).mean()
    ours = _jax_call(jax.value_and_grad(loss, argnums=(0, 1)), jnp.asarray(h), jnp.asarray(e))
    return peer, ours


def embed_op(rng) -> tuple:
    """Token embedding lookup [V,D][tokens] fwd+bwd (the gather and its scatter-add)."""
    import jax
    import jax.numpy as jnp
    import torch
    e, ct = _rand(rng, V, D), _rand(rng, B, T, D)
    tok = rng.integers(0, V, (B, T))
    te, ttok = torch.from_numpy(e).requires_grad_(), torch.from_numpy(tok).long()
    peer = _torch_fwd_bwd(lambda e: torch.nn.functional.embedding(ttok, e), [te],
                          torch.from_numpy(ct))
    jtok = jnp.asarray(tok, jnp.int32)
    ours = _jax_fwd_bwd(lambda e: jnp.take(e, jtok, axis=0), (jnp.asarray(e),), jnp.asarray(ct))
    del jax
    return peer, ours


def optimizer_op(rng) -> tuple:
    """Global-norm clip + AdamW over the dense model's parameter tree: ``train.make_optimizer``
    (jit, donated state) vs ``clip_grad_norm_`` + ``torch.optim.AdamW`` (step.py's groups)."""
    import jax
    import optax
    import torch
    from flax import nnx

    from benchmarks import step
    from moejax import train
    from moejax.mesh import make_mesh
    cfg = step.train_config(step.model_configs()["dense"])
    s = train.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params = nnx.to_pure_dict(train.init_state(s).params)
    grads = jax.tree.map(lambda p: jax.numpy.asarray(0.01 * _rand(rng, *p.shape)), params)
    opt = train.make_optimizer(cfg.train, cfg.model)
    box = {"params": params, "opt": opt.init(params)}

    def apply(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    update = jax.jit(apply, donate_argnums=(0, 1))

    def ours():
        box["params"], box["opt"] = update(box["params"], box["opt"], grads)
        jax.block_until_ready(box["params"])
    t = cfg.train
    leaves = [torch.from_numpy(np.array(p)) for p in jax.tree.leaves(params)]
    for p in leaves:
        p.requires_grad_()
        p.grad = torch.from_numpy(0.01 * _rand(rng, *p.shape))
    topt = torch.optim.AdamW([{"params": [p for p in leaves if p.ndim >= 2],
                               "weight_decay": t.weight_decay},
                              {"params": [p for p in leaves if p.ndim < 2], "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)

    def peer():
        torch.nn.utils.clip_grad_norm_(leaves, t.clip_norm)
        topt.step()
    return peer, ours


def all_ops(rng) -> list[tuple[str, str, int, tuple]]:
    """(name, kind, count per step, (peer, ours)); kind 'dot' = a bare matmul timed on both
    sides (XLA:CPU's dot vs torch's mm), 'ours' = a formulation moejax chooses."""
    ops = []
    projections = [("q", D, H * HD, L), ("k", D, HKV * HD, L), ("v", D, HKV * HD, L),
                   ("o", H * HD, D, L), ("gate", D, F, L), ("up", D, F, L), ("down", F, D, L)]
    for name, K, N, count in projections:
        for part, fns in matmul_ops(rng, K, N).items():
            ops.append((f"{name} proj [{M},{K}]x[{K},{N}] {part}", "dot", count, fns))
    for name, fns in attention_ops(rng).items():
        ops.append((f"{name} fwd+bwd", "ours", L if "layer" in name else 0, fns))
    for name, fns in attention_dot_ops(rng).items():
        ops.append((f"attention {name} batched dot [{B * HKV}] (unblocked, info)", "dot", 0, fns))
    ops.append(("RMSNorm [B,T,256] fwd+bwd", "ours", 2 * L + 1, norm_op(rng, (B, T, D))))
    ops.append(("q-norm [B,T,4,64] fwd+bwd", "ours", L, norm_op(rng, (B, T, H, HD))))
    ops.append(("k-norm [B,T,2,64] fwd+bwd", "ours", L, norm_op(rng, (B, T, HKV, HD))))
    ops.append(("RoPE q,k fwd+bwd", "ours", L, rope_op(rng)))
    ops.append(("SwiGLU silu(g)*u [M,768] fwd+bwd", "ours", L, swiglu_op(rng)))
    ops.append(("LM head (tied) + CE fwd+bwd", "ours", 1, lm_head_ce_op(rng)))
    ops.append(("embedding gather fwd+bwd", "ours", 1, embed_op(rng)))
    ops.append(("clip + AdamW over the param tree", "ours", 1, optimizer_op(rng)))
    return ops


def keep_freed_memory() -> None:
    """glibc malloc with one arena, no mmap'd chunks and no trimming (``moejax.runtime``), forced
    on; must run before XLA's threads start (their arenas are made on first use)."""
    from moejax.runtime import ENV, tune_host_malloc

    os.environ[ENV] = "keep"
    if not tune_host_malloc():
        raise RuntimeError("could not set glibc malloc options (not glibc?)")


def _with_rusage(fn: Callable[[], None], acc: dict, key: str | None = None):
    """fn, adding its user/system CPU seconds and minor page faults to acc (and counting calls
    under ``key``). Wrap both run and wait: jax dispatches a step asynchronously, so its work
    is only all counted once the wait has returned."""
    def wrapped():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        acc["user"] += r1.ru_utime - r0.ru_utime
        acc["sys"] += r1.ru_stime - r0.ru_stime
        acc["minflt"] += r1.ru_minflt - r0.ru_minflt
        if key:
            acc[key] += 1
    return wrapped


def measured_steps(reps: int) -> dict:
    """The two full dense train steps (``benchmarks.step``), interleaved here: median CPU and
    wall ms per step, plus mean user/system ms and minor page faults per step."""
    from benchmarks import step
    cfg = step.train_config(step.model_configs()["dense"])
    batch = step.random_batch(cfg.model.vocab_size)
    ours, ours_wait, params = step.moejax_step(cfg, batch)
    peer, peer_wait = step.hf_step(cfg, params, batch, device="cpu")
    runners = {"peer": (peer, peer_wait), "ours": (ours, ours_wait)}
    for run, wait in runners.values():
        run(), run(), wait()
    usage = {k: dict(user=0.0, sys=0.0, minflt=0, calls=0) for k in runners}
    timed = {k: (_with_rusage(run, usage[k], "calls"), _with_rusage(wait, usage[k]))
             for k, (run, wait) in runners.items()}
    times = step.interleaved(timed, reps=reps, steps=2, warmup=0)
    out = {}
    for k, v in times.items():
        n = usage[k]["calls"]
        out[k] = {"cpu_ms": 1e3 * statistics.median(v["cpu"]),
                  "wall_ms": 1e3 * statistics.median(v["wall"]),
                  "user_ms": 1e3 * usage[k]["user"] / n, "sys_ms": 1e3 * usage[k]["sys"] / n,
                  "minor_faults": usage[k]["minflt"] / n}
    return out


def steps_in_subprocess(keep: bool, reps: int, cpu: int) -> dict:
    """``measured_steps`` in a fresh process (the malloc setting must precede XLA's start)."""
    cmd = [sys.executable, "-m", "benchmarks.ops_cpu", "--steps-only", "--cpu", str(cpu),
           "--step-reps", str(reps)] + (["--keep-freed-memory"] if keep else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarise(rows: list[dict], steps: dict) -> dict:
    """Per-step sums (count x CPU ms) by kind, the gap each kind explains, and per measured step
    mode (malloc default / keep freed memory) the step ratio and what the op sums leave out."""
    def total(side, kind=None):
        return sum(r["count"] * r[side]["cpu_ms"] for r in rows if kind in (None, r["kind"]))
    s = {"per_step_ms": {side: total(side) for side in ("peer", "ours")}}
    for kind in ("dot", "ours"):
        s[f"{kind}_ms"] = {side: total(side, kind) for side in ("peer", "ours")}
        s[f"{kind}_gap_ms"] = total("ours", kind) - total("peer", kind)
    s["ops_gap_ms"] = s["per_step_ms"]["ours"] - s["per_step_ms"]["peer"]
    for mode, step in steps.items():
        m = {"step": step, "step_gap_ms": step["ours"]["cpu_ms"] - step["peer"]["cpu_ms"],
             "step_cpu_ratio": step["peer"]["cpu_ms"] / step["ours"]["cpu_ms"]}
        for side in ("peer", "ours"):
            m[f"unattributed_{side}_ms"] = step[side]["cpu_ms"] - s["per_step_ms"][side]
        s[f"steps_{mode}"] = m
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU to pin to")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--target-s", type=float, default=0.03, help="seconds per timed repetition")
    ap.add_argument("--step-reps", type=int, default=5)
    ap.add_argument("--no-step", action="store_true", help="skip timing the two full steps")
    ap.add_argument("--steps-only", action="store_true",
                    help="only time the two steps in this process; print their JSON")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc malloc keeps freed memory (see keep_freed_memory)")
    ap.add_argument("--only", default=None, help="time only ops whose name contains this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pin_one_core(args.cpu)
    if args.keep_freed_memory:
        keep_freed_memory()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    torch.set_num_threads(1)
    if args.steps_only:
        print(json.dumps(measured_steps(args.step_reps)))
        return {}
    rng = np.random.default_rng(0)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": platform.node(), "jax": jax.__version__, "torch": torch.__version__,
              "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "keep_freed_memory": args.keep_freed_memory,
              "load_avg_1m_start": os.getloadavg()[0], "shapes": dict(B=B, T=T, D=D, H=H, Hkv=HKV,
                                                                      hd=HD, d_ff=F, V=V, L=L),
              "rows": []}
    print("| op | count/step | peer ms | ours ms | ours/peer | kind |\n|---|---|---|---|---|---|")
    for name, kind, count, (peer, ours) in all_ops(rng):
        if args.only and args.only not in name:
            continue
        t = time_pair(peer, ours, reps=args.reps, target_s=args.target_s)
        result["rows"].append({"op": name, "kind": kind, "count": count, **t})
        print(f"| {name} | {count} | {t['peer']['cpu_ms']:.2f} | {t['ours']['cpu_ms']:.2f} | "
              f"{t['ours']['cpu_ms'] / t['peer']['cpu_ms']:.2f} | {kind} |", flush=True)
    steps = {}
    if not (args.no_step or args.only):
        for keep in (False, True):
            steps["keep_freed_memory" if keep else "malloc_default"] = steps_in_subprocess(
                keep, args.step_reps, args.cpu)
    result["summary"] = summarise(result["rows"], steps)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    from moejax.runtime import compile_without_cache
    compile_without_cache()  # compile for this process's CPU threads (see its docstring)
    main()
