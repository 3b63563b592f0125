"""Train-step throughput: moejax vs Hugging Face transformers (torch, eager) on the same model.

One run builds, for each config, the moejax train state, exports its parameters to a Hugging Face
checkpoint (``moejax.interop.hf.export_hf``: identical weights) and loads that into transformers,
then times full train steps of both on the same random batch, *interleaved* (peer rep, ours rep,
peer rep, ...) so that load from other processes hits both sides alike; the ratio is of medians.

  dense  Qwen3: 4 layers, d 256, d_ff 768, 4/2 heads of 64, vocab 320 (tied), fp32
  moe    Qwen3-MoE: the same with 8 experts of d_expert 256, top-2 (norm_topk_prob), softmax router,
         load-balancing loss (coef 1e-2; HF: ``output_router_logits`` + ``router_aux_loss_coef``)

Batch 16 x 256 tokens, AdamW (b 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices, clip 1.0).
A step is: forward, cross entropy, backward, clip, AdamW update (moejax: ``train.make_train_step``,
one jit with donation, metrics read one step late as the Trainer does; HF: ``model(...)``,
``F.cross_entropy``, ``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()``).

    python -m benchmarks.step --out benchmarks/step_cpu.json          # CPU (the default)
    python -m benchmarks.step --peer-experts eager grouped_mm         # also time other HF kernels
    python -m benchmarks.step --profile /tmp/prof                      # + jax.profiler trace
    python -m benchmarks.step --layers 1                               # vs 4: the cost of a layer

``--device gpu`` is the slot for the GPU mode (torch on cuda, jax on the default GPU backend);
only the CPU mode is measured so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import numpy as np

from benchmarks.host import cpu_description

SEQ, BATCH = 256, 16


def model_configs(num_layers: int = 4):
    """name -> moejax ModelConfig of the issue's side-by-side comparison (``num_layers`` deep)."""
    from moejax.config import AttentionConfig, BalanceConfig, ModelConfig, MoEConfig, RouterConfig
    attn = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64)
    dense = ModelConfig(vocab_size=320, d_model=256, num_layers=num_layers, d_ff=768,
                        max_seq_len=SEQ, dtype="float32", attention=attn)
    moe = dataclasses.replace(dense, moe=MoEConfig(
        num_experts=8, top_k=2, d_expert=256,
        router=RouterConfig(kind="topk", score="softmax", norm_topk_prob=True),
        balance=BalanceConfig(coef=1e-2)))
    return {"dense": dense, "moe": moe}


def train_config(model):
    from moejax.config import Config, DataConfig, MeshConfig, TrainConfig
    return Config(model=model, mesh=MeshConfig(data=1), data=DataConfig(seq_len=SEQ),
                  train=TrainConfig(steps=1000, batch_size=BATCH, lr=3e-4, warmup_steps=0,
                                    b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0))


def random_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (BATCH, SEQ + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "loss_mask": np.ones((BATCH, SEQ), np.float32),
            "domain": np.zeros((BATCH,), np.int32)}


# ---------------------------------------------------------------- moejax side

def moejax_step(cfg, batch_np) -> tuple[Callable[[], None], Callable[[], None], dict]:
    """(run one step, wait for the device, the initial params as a pure dict) for moejax."""
    import jax
    from flax import nnx

    from moejax import train
    from moejax.mesh import make_mesh

    s = train.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = train.init_state(s)
    params = jax.device_get(nnx.to_pure_dict(state.params))
    step = train.make_train_step(s, num_domains=1)
    batch = train.global_batch(s.mesh, batch_np)
    box = {"state": state, "pending": None}

    def run():
        box["state"], metrics = step(box["state"], batch)
        if box["pending"] is not None:  # the Trainer reads each step's flags one step late
            bool(jax.device_get(box["pending"]["nonfinite"]))
        box["pending"] = metrics

    def wait():
        jax.block_until_ready(box["state"])
        if box["pending"] is not None:
            bool(jax.device_get(box["pending"]["nonfinite"]))
            box["pending"] = None

    return run, wait, params


# ---------------------------------------------------------------- HF side

def hf_step(cfg, params: dict, batch_np, *, device: str, experts: str = "eager"):
    """(run one step, wait) for transformers on the same weights (exported checkpoint)."""
    import torch
    import transformers

    from moejax.interop.hf import export_hf

    m, t = cfg.model, cfg.train
    with tempfile.TemporaryDirectory() as d:
        export_hf(m, params, d)
        kw = {"experts_implementation": experts} if m.moe.enabled else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = model.to(dev).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
    inputs = torch.from_numpy(batch_np["inputs"]).long().to(dev)
    targets = torch.from_numpy(batch_np["targets"]).long().to(dev)
    moe = m.moe.enabled

    def run():
        out = model(input_ids=inputs, output_router_logits=moe) if moe else model(input_ids=inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.view(-1, m.vocab_size).float(),
                                                 targets.view(-1))
        if moe:
            loss = loss + m.moe.balance.coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()

    def wait():
        if device == "gpu":
            torch.cuda.synchronize()

    return run, wait


# ---------------------------------------------------------------- timing

def interleaved(runners: dict[str, tuple], *, reps: int, steps: int, warmup: int) -> dict:
    """Seconds per step of each runner: ``reps`` rounds, each timing ``steps`` steps of every
    runner in turn (alternating order per round); returns name -> {"wall": [s/step per rep],
    "cpu": [process CPU s/step per rep]} (CPU time is the steadier number on a contended host)."""
    for run, wait in runners.values():
        for _ in range(warmup):
            run()
        wait()
    times = {name: {"wall": [], "cpu": []} for name in runners}
    names = list(runners)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            run, wait = runners[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run()
            wait()
            times[name]["wall"].append((time.perf_counter() - t0) / steps)
            times[name]["cpu"].append((time.process_time() - c0) / steps)
    return times


def thread_settings(threads: int | None) -> dict:
    """Pin torch's intra-op threads (XLA:CPU sizes its intra-op pool from the process's CPU
    affinity: run under ``taskset -c 0`` with ``--threads 1`` for a one-core comparison);
    returns what both sides use, for the record."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    return {"torch_intra_op_threads": torch.get_num_threads(),
            "torch_inter_op_threads": torch.get_num_interop_threads(),
            "xla_cpu_threads": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def profile_moejax(cfg, batch_np, logdir: str, steps: int = 5) -> None:
    """A ``jax.profiler`` trace of ``steps`` moejax train steps (open with TensorBoard/Perfetto)."""
    import jax
    run, wait, _ = moejax_step(cfg, batch_np)
    run(), run(), wait()
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            run()
        wait()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--configs", nargs="+", default=["dense", "moe"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own, = physical cores)")
    ap.add_argument("--peer-experts", nargs="+", default=["eager"],
                    help="HF experts_implementation(s) for the MoE peer; the first is the ratio's")
    ap.add_argument("--layers", type=int, default=4,
                    help="model depth (4: the issue's config; two depths' difference is the cost "
                         "of a layer, the rest is embedding, head, loss and optimizer)")
    ap.add_argument("--profile", default=None, help="also write a jax.profiler trace here")
    ap.add_argument("--out", default=None)
    ap.add_argument("--host-malloc", choices=("keep", "default"), default="keep",
                    help="glibc malloc as every moejax entry point sets it (moejax.runtime), or "
                         "as it comes; both sides share the process")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from moejax.runtime import ENV, tune_host_malloc
    os.environ[ENV] = args.host_malloc
    host_malloc = tune_host_malloc()
    import jax

    settings = thread_settings(args.threads)
    settings["host_malloc_tuned"] = host_malloc
    settings["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    settings["jax_compilation_cache"] = bool(jax.config.jax_enable_compilation_cache)
    configs = model_configs(args.layers)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": args.device, "jax_device": jax.devices()[0].device_kind,
              "machine": platform.node(), "cpu": cpu_description(), "jax": jax.__version__,
              "settings": settings,
              "batch": [BATCH, SEQ], "num_layers": args.layers, "reps": args.reps,
              "steps_per_rep": args.steps,
              "results": {}}
    import torch
    import transformers
    result["torch"], result["transformers"] = torch.__version__, transformers.__version__
    print(f"{result['date']} {args.device} ({result['jax_device']}, {result['cpu']}), "
          f"threads {settings}")
    print("| config | peer | peer tok/s | moejax tok/s | moejax / peer | peer CPU s/step | "
          "moejax CPU s/step | CPU ratio (peer / moejax) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = train_config(configs[name])
        batch = random_batch(cfg.model.vocab_size)
        ours, ours_wait, params = moejax_step(cfg, batch)
        runners = {}
        peers = args.peer_experts if cfg.model.moe.enabled else ["eager"]
        for impl in peers:
            runners[f"hf/{impl}"] = hf_step(cfg, params, batch, device=args.device, experts=impl)
        runners["moejax"] = (ours, ours_wait)
        times = interleaved(runners, reps=args.reps, steps=args.steps, warmup=args.warmup)
        tokens = BATCH * SEQ
        rates = {k: tokens / statistics.median(v["wall"]) for k, v in times.items()}
        cpu = {k: statistics.median(v["cpu"]) for k, v in times.items()}
        main_peer = f"hf/{peers[0]}"
        result["results"][name] = {
            "tokens_per_s": rates, "cpu_seconds_per_step": cpu, "seconds_per_step": times,
            "ratio": rates["moejax"] / rates[main_peer],
            "cpu_ratio": cpu[main_peer] / cpu["moejax"], "peer": main_peer,
            "load_avg_1m": os.getloadavg()[0]}
        for p in peers:
            peer = "hf/" + p
            print(f"| {name} | {p} | {rates[peer]:.0f} | {rates['moejax']:.0f} | "
                  f"{rates['moejax'] / rates[peer]:.2f} | {cpu[peer]:.2f} | {cpu['moejax']:.2f} | "
                  f"{cpu[peer] / cpu['moejax']:.2f} |", flush=True)
        del runners, ours, ours_wait
    if args.profile:
        for name in args.configs:
            profile_moejax(train_config(configs[name]), random_batch(320),
                           os.path.join(args.profile, name))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    from moejax.runtime import compile_without_cache
    compile_without_cache()  # compile for this process's CPU threads (see its docstring)
    main()
