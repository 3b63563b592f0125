"""Rollout throughput: the moejax rollout engine vs Hugging Face transformers ``generate``.

One run builds, for each config, a moejax model (``train.setup`` + ``init_state`` on one device),
exports its parameters to a Hugging Face checkpoint (``moejax.interop.hf.export_hf``: identical
weights) and loads that into transformers (torch fp32, eval), then times whole generate calls of
both on the same batch, *interleaved* (peer call, ours, peer, ...; order alternating per round) so
that load from other processes hits both sides alike; rates are of medians of warm calls.

  grpo-cpu  the ``experiments/grpo.py`` cpu preset's model: 4 layers, d 128, ff 512, 4 heads of 32,
            vocab 259 (byte tokenizer, tied); 16 prompts x G=8, prompt 16, 48 new tokens
  dense512  8 layers, d 512, ff 2048, 8 heads of 64, vocab 259; 8 prompts x G=4, prompt 64, 64 new
  moe       Qwen3-MoE: 4 layers, d 256, 4 heads of 64, 8 experts of d_expert 256, top-2 (softmax,
            norm_topk_prob), vocab 259; 16 prompts x G=8, prompt 16, 48 new tokens

Same batch both sides: prompt b has a random length in [P/2, P] (seeded); moejax gets the Bp
prompts right-padded plus ``num_generations=G`` (it prefills each prompt once and repeats the
cache G times); HF gets the B = Bp*G rows (each prompt repeated G times), left-padded with an
attention mask as batched ``generate`` needs. Both sample (temperature 1, top-k off, top-p
``--top-p``) and emit exactly N new tokens per row: HF with ``eos_token_id=None`` (no EOS
stopping criterion at all), moejax with ``eos_id=-1`` (an id no sample can take). The script
checks both outputs have every row's N tokens, and that greedy decoding of the two agrees token
for token (``greedy_match``: the same weights, positions and masks on both sides).

Generated tokens/s = B*N / wall seconds of one generate call. The prefill share is the time of
the same call with N=1 (prefill + first token; moejax: the same KV bucket) over the full call.

    python -m benchmarks.rollout --out benchmarks/rollout_cpu.json      # CPU (the default)
    taskset -c 0 python -m benchmarks.rollout --threads 1               # one core each side
    python -m benchmarks.rollout --smoke                                # seconds: a tiny check
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
from benchmarks.step import thread_settings


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: a model and its rollout shape (prompts x G rows, P prompt, N new)."""

    model: object  # moejax ModelConfig
    prompts: int
    G: int
    P: int
    N: int

    @property
    def rows(self) -> int:
        return self.prompts * self.G


def _model(d: int, layers: int, heads: int, seq: int, **kw):
    from moejax.config import AttentionConfig, ModelConfig
    return ModelConfig(vocab_size=259, d_model=d, num_layers=layers, d_ff=4 * d, max_seq_len=seq,
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=heads,
                                                 head_dim=d // heads),
                       dtype="float32", init_std=0.02, **kw)


def cases() -> dict[str, Case]:
    """name -> Case of the brief's comparison (issue 11 item 9)."""
    from experiments.grpo import PRESETS
    from moejax.config import MoEConfig, RouterConfig
    moe = MoEConfig(num_experts=8, top_k=2, d_expert=256,
                    router=RouterConfig(kind="topk", score="softmax", norm_topk_prob=True))
    return {
        "grpo-cpu": Case(PRESETS["cpu"].model, prompts=16, G=8, P=16, N=48),
        "dense512": Case(_model(512, 8, 8, 128), prompts=8, G=4, P=64, N=64),
        "moe": Case(_model(256, 4, 4, 64, moe=moe), prompts=16, G=8, P=16, N=48),
        "smoke": Case(_model(32, 1, 2, 16), prompts=2, G=2, P=4, N=4),
    }


def random_prompts(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [Bp,P] right-padded with 0, lengths [Bp] in [P/2, P]) of random non-pad ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(case.P // 2, 1), case.P + 1, case.prompts).astype(np.int32)
    tokens = rng.integers(1, case.model.vocab_size, (case.prompts, case.P)).astype(np.int32)
    tokens[np.arange(case.P)[None] >= lengths[:, None]] = 0
    return tokens, lengths


def left_padded_rows(tokens: np.ndarray, lengths: np.ndarray,
                     G: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's batch: each prompt G times in a row (row b*G+g = prompt b), left-padded with 0 ->
    (input_ids [B,P], attention_mask [B,P])."""
    Bp, P = tokens.shape
    ids, mask = np.zeros((Bp, P), np.int64), np.zeros((Bp, P), np.int64)
    for b, n in enumerate(lengths):
        ids[b, P - n:], mask[b, P - n:] = tokens[b, :n], 1
    return np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0)


# ---------------------------------------------------------------- moejax side

def moejax_setup(model_cfg):
    """(setup, train state, params as a pure numpy dict) of ``model_cfg`` on one device."""
    import jax
    from flax import nnx

    from moejax import train
    from moejax.config import Config, DataConfig, MeshConfig, TrainConfig
    from moejax.mesh import make_mesh
    cfg = Config(model=model_cfg, mesh=MeshConfig(data=1),
                 data=DataConfig(seq_len=model_cfg.max_seq_len),
                 train=TrainConfig(steps=10, batch_size=8, warmup_steps=1))
    s = train.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = train.init_state(s)
    return s, state, jax.device_get(nnx.to_pure_dict(state.params))


def rollout_engine(setup, case: Case, *, new_tokens: int, top_p: float):
    """The engine for ``case`` with a KV bucket of P + case.N whatever ``new_tokens`` is (so N=1
    times the same prefill); eos_id=-1 is an id no sample can take (exactly N tokens per row)."""
    from moejax.rl.rollout import RolloutConfig, RolloutEngine
    cfg = RolloutConfig(max_prompt_len=case.P, max_new_tokens=new_tokens,
                        kv_len=case.P + case.N, temperature=1.0, top_p=top_p, top_k=0,
                        logprobs="policy")
    return RolloutEngine(setup, cfg, eos_id=-1, pad_id=0)


def moejax_runner(engine, state, case: Case, tokens, lengths, *, greedy: bool = False
                  ) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(one generate call -> its result, wait for a result); a new seed per call."""
    import jax
    weights = (state.params, state.rest)
    calls = iter(range(1 << 30))

    def run():
        return engine.generate(weights, tokens, lengths, num_generations=case.G,
                               rng=jax.random.key(next(calls)), greedy=greedy)

    return run, lambda out: jax.block_until_ready(out)


# ---------------------------------------------------------------- HF side

def hf_model(model_cfg, params: dict, *, experts: str = "eager"):
    """transformers model (fp32, eval) holding ``params`` (export -> from_pretrained); no EOS."""
    import torch
    import transformers

    from moejax.interop.hf import export_hf
    with tempfile.TemporaryDirectory() as d:
        export_hf(model_cfg, params, d)
        kw = {"experts_implementation": experts} if model_cfg.moe.enabled else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    model.generation_config.eos_token_id = None  # nothing stops a row before max_new_tokens
    model.config.eos_token_id = None
    return model.eval()


def hf_runner(model, ids: np.ndarray, mask: np.ndarray, *, new_tokens: int, top_p: float,
              greedy: bool = False) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(one ``generate`` call -> its output ids, wait) on the left-padded batch."""
    import torch
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    sampling = {} if greedy else dict(temperature=1.0, top_k=0, top_p=top_p)
    seeds = iter(range(1 << 30))

    def run():
        torch.manual_seed(next(seeds))
        with torch.inference_mode():
            return model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=not greedy,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=0, **sampling)

    return run, lambda out: None


# ---------------------------------------------------------------- checks and timing

def completions_ours(out, lengths: np.ndarray, G: int, N: int) -> np.ndarray:
    """[B,N] generated tokens of a RolloutResult; asserts every row produced exactly N."""
    r = out.numpy()
    assert (r.completion_lengths == N).all(), f"moejax rows stopped early: {r.completion_lengths}"
    start = np.repeat(lengths, G)
    return np.stack([r.tokens[b, s:s + N] for b, s in enumerate(start)])


def completions_hf(out, P: int, N: int) -> np.ndarray:
    """[B,N] generated tokens of HF ``generate`` (left-padded: they start at column P)."""
    out = out.numpy()
    assert out.shape[1] == P + N, f"HF generated {out.shape[1] - P} tokens, not {N}"
    return out[:, P:]


def greedy_match(engine, state, hf, case: Case, tokens, lengths, ids, mask) -> float:
    """Share of greedy tokens on which the two sides agree (1.0 = same model on both sides);
    ``greedy`` is a traced knob, so the engine reuses its sampling program."""
    run, _ = moejax_runner(engine, state, case, tokens, lengths, greedy=True)
    ours = completions_ours(run(), lengths, case.G, case.N)
    peer = completions_hf(hf_runner(hf, ids, mask, new_tokens=case.N, top_p=1.0, greedy=True)[0](),
                          case.P, case.N)
    return float((ours == peer).mean())


def interleaved_calls(runners: dict[str, tuple], *, reps: int, warmup: int) -> dict:
    """name -> {"wall": [s per call], "cpu": [process CPU s per call]} over ``reps`` rounds of
    one call of every runner in turn (order alternating per round) after ``warmup`` calls each."""
    for run, wait in runners.values():
        for _ in range(warmup):
            wait(run())
    times = {name: {"wall": [], "cpu": []} for name in runners}
    names = list(runners)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            run, wait = runners[name]
            t0, c0 = time.perf_counter(), time.process_time()
            wait(run())
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def bench_case(case: Case, *, top_p: float, reps: int, warmup: int, experts: str,
               prefill: bool) -> dict:
    """Times, rates, ratio and checks of one Case (see the module docstring)."""
    setup, state, params = moejax_setup(case.model)
    hf = hf_model(case.model, params, experts=experts)
    tokens, lengths = random_prompts(case)
    ids, mask = left_padded_rows(tokens, lengths, case.G)
    engine = rollout_engine(setup, case, new_tokens=case.N, top_p=top_p)
    runners = {"hf": hf_runner(hf, ids, mask, new_tokens=case.N, top_p=top_p),
               "moejax": moejax_runner(engine, state, case, tokens, lengths)}
    completions_ours(runners["moejax"][0](), lengths, case.G, case.N)  # compiles, checks N
    completions_hf(runners["hf"][0](), case.P, case.N)
    if prefill:
        runners["hf/N=1"] = hf_runner(hf, ids, mask, new_tokens=1, top_p=top_p)
        runners["moejax/N=1"] = moejax_runner(
            rollout_engine(setup, case, new_tokens=1, top_p=top_p), state, case, tokens, lengths)
    times = interleaved_calls(runners, reps=reps, warmup=warmup)
    wall = {k: statistics.median(v["wall"]) for k, v in times.items()}
    cpu = {k: statistics.median(v["cpu"]) for k, v in times.items()}
    rates = {k: case.rows * case.N / wall[k] for k in ("hf", "moejax")}
    result = {
        "model": {"d_model": case.model.d_model, "layers": case.model.num_layers,
                  "vocab": case.model.vocab_size, "experts": case.model.moe.num_experts,
                  "top_k": case.model.moe.top_k if case.model.moe.enabled else 0},
        "prompts": case.prompts, "G": case.G, "rows": case.rows, "P": case.P, "N": case.N,
        "prompt_lengths": lengths.tolist(), "tokens_per_s": rates,
        "ratio": rates["moejax"] / rates["hf"], "cpu_ratio": cpu["hf"] / cpu["moejax"],
        "median_wall_s": wall, "median_cpu_s": cpu, "seconds": times,
        "greedy_match": greedy_match(engine, state, hf, case, tokens, lengths, ids, mask),
        "compiles": engine.compiles,
        "load_avg_1m": os.getloadavg()[0]}
    if prefill:
        result["prefill_share"] = {k: wall[k + "/N=1"] / wall[k] for k in ("hf", "moejax")}
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["grpo-cpu", "dense512", "moe"])
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny 'smoke' config, 1 rep, no prefill timing (a test runs it)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: XLA:CPU's, = the CPU affinity size)")
    ap.add_argument("--peer-experts", default="eager", help="HF experts_implementation (MoE)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the N=1 prefill timing")
    ap.add_argument("--out", default=None)
    ap.add_argument("--host-malloc", choices=("keep", "default"), default="keep",
                    help="glibc malloc as moejax entry points set it (moejax.runtime), or as it "
                         "comes; both sides share the process")
    args = ap.parse_args(argv)
    from moejax.runtime import ENV, tune_host_malloc
    os.environ[ENV] = args.host_malloc
    tune_host_malloc()
    if args.smoke:
        args.configs, args.reps, args.warmup, args.no_prefill = ["smoke"], 1, 1, True
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    import transformers

    settings = thread_settings(args.threads or len(os.sched_getaffinity(0)))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": "cpu", "cpu": cpu_description(), "machine": platform.node(),
              "jax": jax.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "settings": settings,
              "top_p": args.top_p, "temperature": 1.0, "peer_experts": args.peer_experts,
              "reps": args.reps, "results": {}}
    print(f"{result['date']} {result['cpu']}, threads {settings}")
    print("| config | rows x N | HF tok/s | moejax tok/s | moejax / HF | CPU ratio | "
          "prefill share HF / moejax | greedy match |")
    print("|---|---|---|---|---|---|---|---|")
    all_cases = cases()
    for name in args.configs:
        case = all_cases[name]
        r = bench_case(case, top_p=args.top_p, reps=args.reps, warmup=args.warmup,
                       experts=args.peer_experts, prefill=not args.no_prefill)
        result["results"][name] = r
        pre = r.get("prefill_share")
        pre = f"{pre['hf']:.2f} / {pre['moejax']:.2f}" if pre else ""
        print(f"| {name} | {case.rows} x {case.N} | {r['tokens_per_s']['hf']:.0f} | "
              f"{r['tokens_per_s']['moejax']:.0f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | "
              f"{pre} | {r['greedy_match']:.3f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    from moejax.runtime import compile_without_cache
    compile_without_cache()  # compile for this process's CPU threads (see its docstring)
    main()
