"""Fine-tune an imported Hugging Face checkpoint: plain vs EMoE conversion vs GW-MoE
(EMoE, section 6, and GW-MoE, section 7 of shared/methods/architecture.md).

``--source`` is a local HF model directory (Qwen3 / Qwen3-MoE / Qwen3-Next blocks; imported once into
``workdir/_import`` with ``moejax.interop.hf``) or an already imported moejax WORKDIR. The model
comes from the source; the preset sets data, schedule and compute dtype (parameters are trained in
fp32). Arms depend on the source:

    dense source (Qwen3):
      plain     fine-tune the model as it is
      emoe      EMoE: split each FFN by balanced k-means of its gate keys into 8 neuron blocks,
                route top-4 blocks by average key (no new parameters, no balance loss: EMoE
                has none), in every layer, then fine-tune
      emoe_gw   EMoE as above plus GW-MoE: the first uncertain token per sequence (router entropy
                >= 0.8 ln E) gets the dense mixture of all experts during training
      emoe64    EMoE as in the paper (section 6.2): 64 blocks, top-16, only every 4th layer of
                the last half (``moejax.upcycle.moe_layer_choice``; 'last_quarter' = every 2nd
                of the last quarter); when d_ff divides by 64 and layers are not scanned
    MoE source (Qwen3-MoE / Qwen3-Next):
      plain     fine-tune the model as it is
      gwmoe     GW-MoE with the same threshold (inference stays plain top-k)

Out-of-distribution evaluation (EMoE's headline): give a domain weight 0,
``--set data.mixture=1,1,0``; the arms fine-tune on the others, and the report splits the final
loss into in-distribution and held-out (OOD) loss and plots both against fine-tuning FLOPs. The
report's active GFLOPs/token column and FLOPs plots compare arms of different active compute
(EMoE top-4 of 8 uses half the FFN neurons per token) at equal compute.

Smallest preset that can show the direction: ``cpu`` on the exported ``pretrain`` cpu model with
a held-out domain. EMoE needs a pretrained FFN whose neurons already cluster (a random tiny source,
as in cpu-smoke, has none: the smoke preset only checks the plumbing); gpu/tpu presets need a real
fine-tuning corpus (``--set data.corpus=...``): the embedded corpus is repeated many times by their
budgets (the report's passes table warns).

Data: the embedded corpus (code / prose / math) or a local JSONL (``--set data.corpus=path.jsonl``,
one ``{"text": ..., "domain": ...}`` per line; the domains present in the file are used), tokenised
with the source's ``tokenizer.json`` when it has one, else bytes (vocab must then be >= 259).

Command:
    python -m experiments.finetune --source /path/to/Qwen3-0.6B --preset gpu --workdir runs/ft

Presets: cpu-smoke (CI: tiny models the test builds with transformers; it
runs plain and emoe_gw on a dense source and gwmoe on an MoE source; every arm's config is
built), cpu (150
steps of 16 x 256 tokens, for small sources of a few M parameters: from the exported ``pretrain``
cpu model, 23:23 wall on 2 cores for the three arms with ragged_dot as the CPU grouped matmul:
~2.5 min plain, ~10 min per EMoE arm at 4.5 s/step; the 'blocked' CPU default since then runs
EMoE steps at 2.7 s), gpu (Qwen3-0.6B-sized source,
bf16 compute, 2000 steps of 32 x 2048; not run: no GPU this session), tpu-v5p-8 (a
Qwen3-1.7B-sized source, FSDP over 4 v5p chips, 32 x 2048; ``python -m moejax.aot --experiment
finetune --preset tpu-v5p-8`` compiles it for that shape, ``AOT_SOURCE``, without a source).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
from flax import nnx

from experiments.upcycle import held_out, plot_loss_vs_flops, pooled_loss
from moejax import experiment, upcycle
from moejax import train as T
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps
from moejax.config import Config, DataConfig, GrowthConfig, MeshConfig, ModelConfig, TrainConfig
from moejax.data.corpus import jsonl_documents
from moejax.interop import hf
from moejax.analysis.routing import domain_frequencies, specialisation
from moejax.metrics import read_metrics
from moejax.trainer import Trainer

PRESETS: dict[str, Config] = {
    "cpu-smoke": Config(
        model=ModelConfig(dtype="float32"),
        data=DataConfig(seq_len=64, corpus_bytes_per_domain=300_000),
        train=TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, log_every=1,
                          eval_every=2, eval_batches=1, ckpt_every=2, async_ckpt=False)),
    "cpu": Config(
        model=ModelConfig(dtype="float32"),
        data=DataConfig(seq_len=256, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=150, batch_size=16, lr=3e-4, min_lr_ratio=0.1, warmup_steps=10,
                          weight_decay=0.0, log_every=10, eval_every=25, eval_batches=4,
                          ckpt_every=50)),
    "gpu": Config(
        model=ModelConfig(dtype="bfloat16", remat="dots"),
        data=DataConfig(seq_len=2048, corpus_bytes_per_domain=20_000_000, prefetch_threads=4),
        train=TrainConfig(steps=2000, batch_size=32, lr=2e-5, min_lr_ratio=0.1, warmup_steps=100,
                          weight_decay=0.0, log_every=20, eval_every=200, eval_batches=8,
                          ckpt_every=500)),
    "tpu-v5p-8": Config(  # a Qwen3-1.7B-sized source (import it with scan_layers) over 4 chips
        model=ModelConfig(dtype="bfloat16", remat="dots"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(seq_len=2048, corpus_bytes_per_domain=20_000_000, prefetch_threads=8),
        train=TrainConfig(steps=2000, batch_size=32, lr=2e-5, min_lr_ratio=0.1, warmup_steps=100,
                          weight_decay=0.0, log_every=20, eval_every=200, eval_batches=8,
                          ckpt_every=500)),
}

# The source shape the tpu-* presets are compiled for by ``moejax.aot`` (no HF directory needed):
# Qwen3-1.7B's config.json, read as an import reads it.
AOT_SOURCE = {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
              "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}

EMOE_EXPERTS, EMOE_TOPK, GW_NORMALISED_THRESHOLD = 8, 4, 0.8
# EMoE as in the paper (section 6.2): 64 blocks, top-16, every 4th layer of the last half
PAPER_EXPERTS, PAPER_TOPK, PAPER_LAYERS = 64, 16, "last_half"


def gw_threshold(num_experts: int) -> float:
    """Raw router-entropy threshold tau = 0.8 ln E (the paper's 1.6-1.8 at E=8 is 0.77-0.87)."""
    return round(GW_NORMALISED_THRESHOLD * math.log(num_experts), 4)


def arms_for(model: ModelConfig) -> dict[str, tuple[str, ...]]:
    if model.moe.enabled:
        return {"plain": (), "gwmoe": (
            f"model.moe.router.gw_entropy_threshold={gw_threshold(model.moe.num_experts)}",)}
    emoe = emoe_overrides(model, EMOE_EXPERTS, EMOE_TOPK)
    arms = {"plain": (), "emoe": emoe,
            "emoe_gw": emoe + (f"model.moe.router.gw_entropy_threshold="
                               f"{gw_threshold(EMOE_EXPERTS)}",)}
    if model.d_ff % PAPER_EXPERTS == 0 and not model.scan_layers:  # scanned: no dense/MoE mix
        arms["emoe64"] = emoe_overrides(model, PAPER_EXPERTS, PAPER_TOPK, PAPER_LAYERS)
    return arms


def emoe_overrides(model: ModelConfig, experts: int, top_k: int,
                   layers: str = "all") -> tuple[str, ...]:
    """An EMoE conversion of the dense ``model``: ``experts`` blocks of d_ff/experts neurons,
    top-k by average key, no balance loss (EMoE has none), in every layer or EMoE's layer choice
    (``moejax.upcycle.moe_layer_choice``)."""
    out = (f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}",
           f"model.moe.d_expert={model.d_ff // experts}", "model.moe.router.gating=avg_key",
           "model.moe.balance.scope=none")
    if layers != "all":
        first, every = upcycle.moe_layer_choice(model.num_layers, layers)
        out += (f"model.moe.first_dense_layers={first}", f"model.moe.moe_every={every}")
    return out


def prepare_source(source: str, workdir: str) -> str:
    """An imported WORKDIR for ``source`` (imported once into ``workdir/_import``)."""
    if hf.is_imported(source):
        return source
    dst = os.path.join(workdir, "_import")
    if not hf.is_imported(dst):
        hf.import_to_workdir(source, dst)
    return dst


def source_config(import_dir: str) -> Config:
    with open(os.path.join(import_dir, "config.json")) as f:
        return Config.from_dict(json.load(f))


def presets_for(src: Config, corpus: str | None) -> dict[str, Config]:
    """The presets with the source's model (fp32 parameters, the preset's compute dtype/remat) and
    tokenizer; a JSONL corpus brings its own domains."""
    out = {}
    for name, p in PRESETS.items():
        model = dataclasses.replace(src.model, dtype=p.model.dtype, remat=p.model.remat,
                                    param_dtype="float32")
        # sequences never exceed the source's context (HF max_position_embeddings)
        data = dataclasses.replace(p.data, tokenizer=src.data.tokenizer,
                                   seq_len=min(p.data.seq_len, src.model.max_seq_len))
        if corpus and corpus.endswith(".jsonl"):
            domains = tuple(sorted(jsonl_documents(corpus)))
            data = dataclasses.replace(data, corpus=corpus, domains=domains,
                                       mixture=(1.0,) * len(domains))
        out[name] = dataclasses.replace(p, model=model, data=data)
    return out


def aot_experiment() -> tuple[dict[str, Config], dict[str, tuple[str, ...]]]:
    """(presets, arms) as ``main`` builds them for a source of ``AOT_SOURCE``'s shape (scanned
    layers): what ``python -m moejax.aot --experiment finetune --preset tpu-v5p-8`` compiles."""
    from moejax.interop import qwen3
    src = Config(model=qwen3.config_from_hf(AOT_SOURCE, scan_layers=True))
    return presets_for(src, None), arms_for(src.model)


def make_run_arm(import_dir: str, src: Config):
    def run_arm(cfg: Config, workdir: str) -> dict:
        source_cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(src.model, dtype=cfg.model.dtype,
                                           remat=cfg.model.remat, param_dtype="float32"),
            growth=GrowthConfig())
        # an MoE arm on a dense source is an EMoE conversion (avg-key routing, or the learnable
        # router initialised from the block centroids with gating='learned')
        converts = cfg.model.moe.enabled and not src.model.moe.enabled
        method = "emoe" if cfg.model.moe.router.gating == "avg_key" else "emoe_learn"

        def init_state_fn(setup: T.Setup, it) -> T.TrainState:
            src_setup = T.setup(source_cfg, setup.mesh) if converts else setup
            state = T.init_state(src_setup)
            target = nnx.to_pure_dict(src_setup.abstract_state.params)
            nnx.replace_by_pure_dict(state.params, hf.load_workdir_params(
                import_dir, source_cfg.model, target))
            if converts:
                state = upcycle.upcycle(state, src_setup, setup, method,
                                        kmeans_iters=cfg.growth.kmeans_iters,
                                        key=jax.random.key(cfg.train.seed + 17))
            return state

        return Trainer(cfg, workdir, init_state_fn=init_state_fn).run()
    return run_arm


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    first = read_metrics(os.path.join(next(iter(workdirs.values())), "metrics.jsonl"))
    first_cfg = json.load(open(os.path.join(next(iter(workdirs.values())), "config.json")))
    domains = sorted(k.split("/")[-1] for k in first[0] if k.startswith("val/loss/"))
    fit, held = held_out(first_cfg)
    ood_cols = ["ID loss", "OOD loss"] if held else []
    header = ["arm", "active GFLOPs/token", "val loss at step 0", "final val loss", *domains,
              *ood_cols, "mean router entropy", "domain specialisation"]
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    heatmaps, id_curves, ood_curves = [], {}, {}
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        evals = [r for r in recs if "val/loss" in r]
        last = evals[-1]
        with open(os.path.join(wd, "config.json")) as f:
            cfg = Config.from_dict(json.load(f))
        moe = cfg.model.moe
        fpt = cfg.model.flops_per_token(cfg.data.seq_len)
        ent = [np.mean([v for k, v in r.items() if k.startswith("moe/entropy/layer")])
               for r in recs if any(k.startswith("moe/entropy/layer") for k in r)]
        spec = "n/a"
        if "moe/domain_counts" in last and moe.num_experts:
            freq = domain_frequencies(last, moe.top_k)
            spec = f"{specialisation(freq):.2f}"
            heatmaps.append(plot_domain_heatmaps(freq, os.path.join(plots, f"heatmap_{arm}.png"),
                                                 domains=cfg.data.domains,
                                                 title=f"{arm}: expert use / uniform"))
        x = np.array([r.get("tokens", 0) * fpt for r in evals], np.float64)
        id_curves[arm] = (x, np.array([pooled_loss(r, fit) for r in evals]))
        cols = [arm, f"{fpt / 1e9:.4g}", f"{evals[0]['val/loss']:.4f}", f"{last['val/loss']:.4f}",
                *[f"{last.get(f'val/loss/{d}', float('nan')):.3f}" for d in domains]]
        if held:
            cols += [f"{pooled_loss(last, fit):.4f}", f"{pooled_loss(last, held):.4f}"]
            ood_curves[arm] = (x, np.array([pooled_loss(r, held) for r in evals]))
        cols += [f"{np.mean(ent[-5:]):.3f}" if ent else "n/a", spec]
        rows.append("| " + " | ".join(cols) + " |")
    curves = plot_curves(workdirs, ["train/loss", "val/loss"], os.path.join(plots, "loss.png"),
                         title="fine-tuning an imported checkpoint")
    figs = [plot_loss_vs_flops(id_curves, os.path.join(plots, "id_loss_vs_flops.png"),
                           "in-distribution val loss vs fine-tuning FLOPs")]
    if held:
        figs.append(plot_loss_vs_flops(ood_curves, os.path.join(plots, "ood_loss_vs_flops.png"),
                                   f"held-out ({', '.join(held)}) val loss vs fine-tuning FLOPs"))
    ood_text = (f"Out of distribution: the arms fine-tune on {', '.join(fit)} and never see "
                f"{', '.join(held)} (weight 0 in data.mixture); ID / OOD loss = token-weighted "
                "val loss over those domains. " if held else "")
    text = "\n".join([
        "# Fine-tuning an imported checkpoint: plain vs EMoE vs GW-MoE", "",
        "Val loss at step 0 = the (converted) model before any update. Active GFLOPs/token = "
        "training FLOPs per token over the active parameters: the FLOPs plots put arms of "
        "different active compute on one axis. " + ood_text + "Domain specialisation = mean "
        "over layers and domains of the hottest expert's selection rate relative to uniform.", "",
        *rows, "", f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(f)}](plots/{os.path.basename(f)})" for f in figs], "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)  # what the presets depend on, read up front
    pre.add_argument("--source")
    known, rest = pre.parse_known_args(argv)  # rest: the shared experiment CLI, without --source
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--workdir")
    peek.add_argument("--set", action="append", default=[])
    seen, _ = peek.parse_known_args(rest)
    if not known.source or not seen.workdir:
        raise SystemExit("experiments.finetune needs --source (a local HF model dir or an imported "
                         "WORKDIR) and --workdir")
    corpus = next((kv.split("=", 1)[1] for kv in seen.set if kv.startswith("data.corpus=")), None)
    import_dir = prepare_source(known.source, seen.workdir)
    src = source_config(import_dir)
    return experiment.main(description=__doc__, presets=presets_for(src, corpus),
                           arms=arms_for(src.model), run_arm=make_run_arm(import_dir, src),
                           report=report, argv=rest)

if __name__ == "__main__":
    main()
