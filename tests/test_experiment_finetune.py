"""experiments/finetune.py end to end on tiny transformers-built checkpoints (nothing downloaded):
a dense Qwen3 source through plain / EMoE+GW on the embedded corpus, and a Qwen3-MoE source through
GW-MoE on a local JSONL corpus; every arm of every preset builds for both kinds of source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from experiments import finetune
from moejax.experiment import build_config
from moejax.data.tokenizer import BPETokenizer
from moejax.interop import hf
from moejax.metrics import read_metrics

SMOKE = ["--preset", "cpu-smoke", "--set", "mesh.data=4", "--set", "mesh.tensor=2"]
# the tiny sources the end-to-end tests build with transformers, as config.json dicts
DENSE_SOURCE = dict(model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    tie_word_embeddings=True)
MOE_SOURCE = dict(model_type="qwen3_moe", vocab_size=320, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True)
# plain: the imported model as it is; emoe_gw: an EMoE conversion (k-means blocks, avg-key
# routing) trained with GW-MoE. emoe alone is emoe_gw without GW; emoe64's layer choice is
# tests/test_upcycle.py's and runs end to end in tests/test_experiments_growth.py (upcycle)
DENSE_SMOKE_ARMS = ("plain", "emoe_gw")


def _source(hf_config: dict):
    from moejax.config import Config
    from moejax.interop import qwen3
    return Config(model=qwen3.config_from_hf(hf_config))


@pytest.mark.parametrize("hf_config", [DENSE_SOURCE, MOE_SOURCE], ids=["dense", "moe"])
def test_every_arm_of_every_preset_builds(hf_config):
    """The arms the source gets, each preset's config of each arm, and (cpu-smoke, the shape the
    end-to-end tests train) the arm's model initialised abstractly."""
    from flax import nnx
    import jax
    from moejax.model import Model
    src = _source(hf_config)
    presets, arms = finetune.presets_for(src, None), finetune.arms_for(src.model)
    assert set(arms) == ({"plain", "gwmoe"} if src.model.moe.enabled
                         else {"plain", "emoe", "emoe_gw", "emoe64"})
    for preset in presets:
        for arm in arms:
            cfg = build_config(presets, arms, preset, arm, [])
            assert cfg.model.param_dtype == "float32"
            if preset == "cpu-smoke":
                m = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
                n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
                assert n == cfg.model.num_params(), arm
    if src.model.moe.enabled:
        return
    paper = build_config(presets, arms, "cpu-smoke", "emoe64", []).model.moe
    assert (paper.num_experts, paper.top_k, paper.d_expert) == (64, 16, 2)
    assert (paper.first_dense_layers, paper.moe_every) == (1, 4)  # 2 layers: layer 1
    assert paper.balance.scope == "none" and paper.router.gating == "avg_key"
    emoe = build_config(presets, arms, "cpu-smoke", "emoe", []).model.moe
    assert (emoe.num_experts, emoe.top_k, emoe.router.gw_entropy_threshold) == (8, 4, 0.0)


def _save(model_cls, cfg, directory: str) -> None:
    torch.manual_seed(0)
    getattr(transformers, model_cls)(cfg).save_pretrained(directory)


@pytest.mark.slow
def test_finetune_dense_source_plain_emoe_gw(tmp_path, data_cache):
    src = str(tmp_path / "qwen3")
    _save("Qwen3ForCausalLM", transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True), src)
    wd = str(tmp_path / "ft")
    out = finetune.main(["--source", src, "--workdir", wd, *SMOKE, "--set", "data.mixture=1,1,0",
                         "--arms", ",".join(DENSE_SMOKE_ARMS),
                         "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(DENSE_SMOKE_ARMS)
    assert all(s["step"] == 4 for s in out.values())
    text = open(os.path.join(wd, "report.md")).read()
    assert "| ID loss | OOD loss |" in text and "never see math" in text
    assert os.path.getsize(os.path.join(wd, "plots", "ood_loss_vs_flops.png")) > 1000
    plain = read_metrics(os.path.join(wd, "plain", "metrics.jsonl"))
    emoe = read_metrics(os.path.join(wd, "emoe_gw", "metrics.jsonl"))
    # the imported weights are used: the dense arm starts from the source's loss, and EMoE with
    # top-4 of 8 blocks (GW acts in training only) starts close to it (half the neurons active),
    # far from a fresh init
    assert abs(plain[0]["val/loss"] - emoe[0]["val/loss"]) < 0.5
    cfg = json.load(open(os.path.join(wd, "emoe_gw", "config.json")))
    assert cfg["model"]["moe"]["router"]["gw_entropy_threshold"] == pytest.approx(0.8 * np.log(8),
                                                                                  abs=1e-3)
    assert "emoe" in open(os.path.join(wd, "report.md")).read()
    # a fine-tuned run exports back to transformers (latest checkpoint -> config.json + safetensors)
    exported = str(tmp_path / "exported")
    hf.main(["export", os.path.join(wd, "plain"), "--out", exported])
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.vocab_size == 320


@pytest.mark.slow
def test_finetune_moe_source_on_jsonl(tmp_path, data_cache):
    src = str(tmp_path / "qwen3moe")
    _save("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True), src)
    corpus = tmp_path / "ft.jsonl"
    rng = np.random.default_rng(0)
    texts = []
    with open(corpus, "w") as f:
        for i in range(200):
            dom = "qa" if i % 2 else "notes"
            texts.append(f"{dom} {i}: " + " ".join(f"w{int(x)}" for x in rng.integers(0, 50, 40)))
            f.write(json.dumps({"text": texts[-1], "domain": dom}) + "\n")
    # the source ships a tokenizer.json (a byte-level BPE trained here): the run must use it
    BPETokenizer.train(texts, vocab_size=300).save(os.path.join(src, "tokenizer.json"))
    wd = str(tmp_path / "ft")
    out = finetune.main(["--source", src, "--workdir", wd, *SMOKE, "--arms", "gwmoe",
                         "--set", f"data.corpus={corpus}", "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == {"gwmoe"}  # plain is the same import without GW (the dense test runs it)
    cfg = json.load(open(os.path.join(wd, "gwmoe", "config.json")))
    assert cfg["data"]["tokenizer"].endswith("_import/hf/tokenizer.json")
    rec = read_metrics(os.path.join(wd, "gwmoe", "metrics.jsonl"))
    assert {"val/loss/notes", "val/loss/qa"} <= set(rec[0])
    assert np.isfinite(rec[-1].get("val/loss", rec[-2].get("val/loss")))
