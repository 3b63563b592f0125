"""HF interop against transformers itself: tiny random Qwen3 / Qwen3-MoE / Qwen3-Next models are
built locally (nothing downloaded), imported, and must give the same fp32 logits; export must round
trip bit-exactly and load back into transformers; broken checkpoints must fail naming the tensor."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from moejax.config import (AttentionConfig, Config, ConfigError, MeshConfig, ModelConfig,
                           MoEConfig, RouterConfig)
from moejax.interop import hf as H
from moejax.interop.safetensors_dir import CheckpointError, SafetensorsDir
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model

V, B, T = 96, 8, 12
TOKENS = np.random.default_rng(0).integers(0, V, (B, T))

# name -> (transformers config class, model class, config kwargs): GQA ratios 2/4/1, head_dim !=
# d/heads, tied/untied, norm_topk_prob on/off, dense first layer, sparse step 2, shared expert
CASES = {
    "qwen3_gqa2_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "qwen3_mqa_untied": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, rope_theta=500.0)),
    "moe_dense0_nonorm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False)),
    "moe_step2_norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=True)),
    "next_shared": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[1], layer_types=["full_attention"] * 3)),
}


def randomize(model: torch.nn.Module, zero_centered: bool, seed: int = 0) -> None:
    """Non-trivial weights everywhere (HF inits norms to 1/0 and routers near-uniform): norms
    around their neutral value, router logits spread enough that top-k choices are clear-cut."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((0.0 if zero_centered else 1.0) + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.08 * noise)


def build(case: str, directory: str, dtype=torch.float32) -> torch.nn.Module:
    cfg_cls, model_cls, kw = CASES[case]
    cfg = getattr(transformers, cfg_cls)(vocab_size=V, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize(model, zero_centered=case.startswith("next"))
    model.to(dtype).save_pretrained(directory)
    return model.float()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """case -> (directory, fp32 reference logits [B,T,V])."""
    out = {}
    for case in CASES:
        d = str(tmp_path_factory.mktemp(case))
        model = build(case, d)
        with torch.no_grad():
            out[case] = (d, model(torch.tensor(TOKENS)).logits.numpy())
    return out


def moejax_logits(model_cfg: ModelConfig, params: dict, mesh=None, mesh_cfg=None) -> np.ndarray:
    mesh_cfg = mesh_cfg or MeshConfig(data=1)
    mesh = mesh or make_mesh(mesh_cfg, jax.devices()[:1] if mesh_cfg == MeshConfig(data=1) else None)
    with use_mesh(mesh, rules_for(mesh_cfg)):
        abstract = nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(0)))
        graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        # one compiled program: eager op-by-op dispatch of the EP shard_map is far slower
        logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(TOKENS, jnp.int32))
    return np.asarray(logits)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


ONE = MeshConfig(data=1)


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_logits(hf_models, case):
    d, ref = hf_models[case]
    mesh = make_mesh(ONE, jax.devices()[:1])
    model_cfg, params, report = H.import_hf(d, mesh=mesh, mesh_cfg=ONE)
    assert report["consumed"] == report["tensors"] and not report["ignored"]
    assert rel_err(moejax_logits(model_cfg, params, mesh, ONE), ref) < 1e-4


@pytest.mark.parametrize("case,mesh_cfg", [
    ("moe_dense0_nonorm", MeshConfig(data=2, expert=4)),
    ("next_shared", MeshConfig(data=1, expert=4, tensor=2)),
    ("qwen3_gqa2_tied", MeshConfig(data=4, tensor=2)),
])
def test_import_on_8_devices_shards_experts_and_matches(hf_models, case, mesh_cfg):
    d, ref = hf_models[case]
    mesh = make_mesh(mesh_cfg)
    model_cfg, params, _ = H.import_hf(d, mesh=mesh, mesh_cfg=mesh_cfg)
    # parity with transformers needs every assignment: the exactly dropless EP exchange (the
    # default finite buffer drops overflow of these deliberately skewed random routers)
    model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe,
                                                                       ep_buffer_factor=0.0))
    if model_cfg.moe.enabled:
        moe_layer = next(l for l in range(model_cfg.num_layers) if model_cfg.moe.is_moe_layer(l))
        w = params["layers"][moe_layer]["mlp"]["w_gate"]
        assert w.sharding.spec[0] == "expert"
        assert w.addressable_shards[0].data.shape[0] == model_cfg.moe.num_experts // 4
    assert rel_err(moejax_logits(model_cfg, params, mesh, mesh_cfg), ref) < 1e-4


def test_import_with_scanned_layers(hf_models):
    d, ref = hf_models["qwen3_mqa_untied"]
    mesh = make_mesh(ONE, jax.devices()[:1])
    model_cfg, params, _ = H.import_hf(d, mesh=mesh, mesh_cfg=ONE, scan_layers=True)
    assert params["layers"]["attn"]["q"].shape[0] == model_cfg.num_layers
    assert rel_err(moejax_logits(model_cfg, params, mesh, ONE), ref) < 1e-4


def _tensors(directory: str) -> dict[str, np.ndarray]:
    r = SafetensorsDir(directory)
    return r.read(r.names)


@pytest.mark.parametrize("case", ["qwen3_gqa2_tied", "moe_dense0_nonorm", "next_shared"])
def test_import_export_round_trip_is_bit_identical(hf_models, tmp_path, case):
    d, ref = hf_models[case]
    model_cfg, params, _ = H.import_hf(d, mesh=make_mesh(ONE, jax.devices()[:1]), mesh_cfg=ONE)
    out = str(tmp_path / "out")
    files = H.export_hf(model_cfg, params, out, max_shard_bytes=16_000, side_dir=d)
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    a, b = _tensors(d), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(TOKENS)).logits.numpy(), ref)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    d = str(tmp_path / "bf16")
    build("moe_dense0_nonorm", d, dtype=torch.bfloat16)
    model_cfg, params, report = H.import_hf(d, mesh=make_mesh(ONE, jax.devices()[:1]), mesh_cfg=ONE)
    assert report["param_dtype"] == "bfloat16"
    assert params["embed"]["embedding"].dtype == jnp.bfloat16
    H.export_hf(model_cfg, params, str(tmp_path / "out"))
    a, b = _tensors(d), _tensors(str(tmp_path / "out"))
    assert all(b[n].dtype == ml_dtypes.bfloat16 and np.array_equal(a[n], b[n]) for n in a)


EXPORT_MODELS = {
    "dense_scanned": ModelConfig(
        vocab_size=V, d_model=32, num_layers=2, d_ff=48, dtype="float32", tie_embeddings=False,
        scan_layers=True, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8)),
    "moe_mixed": ModelConfig(
        vocab_size=V, d_model=32, num_layers=3, d_ff=48, dtype="float32",
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=16, first_dense_layers=1,
                      router=RouterConfig(norm_topk_prob=False))),
    "next_gated": ModelConfig(
        vocab_size=V, d_model=32, num_layers=2, d_ff=48, dtype="float32", norm="rms_zero_centered",
        tie_embeddings=False,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_fraction=0.25,
                                  gate="g1", gate_layout="qwen3_next"),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=16, num_shared_experts=1, d_shared=24,
                      shared_gate=True)),
}


@pytest.mark.parametrize("name", list(EXPORT_MODELS))
def test_moejax_model_exports_to_transformers_with_same_logits(tmp_path, name):
    model_cfg = EXPORT_MODELS[name]
    mesh = make_mesh(ONE, jax.devices()[:1])
    with use_mesh(mesh, rules_for(ONE)):
        model = Model(model_cfg, rngs=nnx.Rngs(3))
        _, state, _ = nnx.split(model, nnx.Param, ...)
        # spread the router so top-k choices are not near-ties between implementations
        params = nnx.to_pure_dict(state)
    for l in range(model_cfg.num_layers):
        if model_cfg.moe.is_moe_layer(l):
            layer = params["layers"] if model_cfg.scan_layers else params["layers"][l]
            layer["mlp"]["router"]["w"] = layer["mlp"]["router"]["w"] * 50.0
    ours = moejax_logits(model_cfg, params, mesh, ONE)
    out = str(tmp_path / name)
    H.export_hf(model_cfg, params, out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(TOKENS)).logits.numpy()
    assert rel_err(ours, theirs) < 1e-4


def write_tokenizer(directory: str) -> None:
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0},
                                               "unk_token": "a"}}, f)


def _corrupt(src: str, dst: str, edit) -> None:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = _tensors(dst)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(EXPERT), f"'{EXPERT}' is missing"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.3.upproj.weight", t.pop(EXPERT)),
     f"'{EXPERT}' is missing"),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT][:-1]), f"tensor '{EXPERT}' has shape [15, 32]"),
    (lambda t: t.__setitem__("model.layers.1.mlp.extra.weight", np.zeros(3, np.float32)),
     "unexpected tensor 'model.layers.1.mlp.extra.weight'"),
])
def test_broken_checkpoint_names_the_tensor(hf_models, tmp_path, edit, message):
    d = str(tmp_path / "broken")
    _corrupt(hf_models["moe_dense0_nonorm"][0], d, edit)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        H.import_hf(d, mesh=make_mesh(ONE, jax.devices()[:1]), mesh_cfg=ONE)


@pytest.mark.parametrize("same", [True, False])
def test_tied_checkpoint_with_a_stored_lm_head(hf_models, tmp_path, same):
    """A tied model that also stores lm_head.weight: equal is consumed (import and workdir load),
    different is an error naming the tensor."""
    d, ref = hf_models["qwen3_gqa2_tied"]
    src = str(tmp_path / "tied")
    _corrupt(d, src, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]
                                             + (0.0 if same else 1.0)))
    write_tokenizer(src)
    if not same:
        with pytest.raises(CheckpointError, match="'lm_head.weight' differs"):
            H.import_to_workdir(src, str(tmp_path / "work"), mesh_cfg=ONE)
        return
    work = str(tmp_path / "work")
    cfg = H.import_to_workdir(src, work, mesh_cfg=ONE)
    mesh = make_mesh(ONE, jax.devices()[:1])
    target = H.abstract_params(cfg.model, mesh, ONE)
    params = H.load_workdir_params(work, cfg.model, target)
    assert rel_err(moejax_logits(cfg.model, params, mesh, ONE), ref) < 1e-4


def test_ignored_prefix_is_reported_not_silent(hf_models, tmp_path):
    d = str(tmp_path / "mtp")
    _corrupt(hf_models["qwen3_gqa2_tied"][0], d,
             lambda t: t.__setitem__("mtp.fc.weight", np.ones((2, 2), np.float32)))
    _, _, report = H.import_hf(d, mesh=make_mesh(ONE, jax.devices()[:1]), mesh_cfg=ONE,
                               ignore=("mtp.",))
    assert report["ignored"] == ["mtp.fc.weight"]


@pytest.mark.parametrize("field,value,message", [
    ("layer_types", ["linear_attention", "full_attention"], r"layer_types\[0\]='linear_attention'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type='yarn'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_unsupported_config_fails_naming_the_field(hf_models, tmp_path, field, value, message):
    d = str(tmp_path / "cfg")
    shutil.copytree(hf_models["qwen3_gqa2_tied"][0], d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=message):
        H.import_hf(d, mesh=make_mesh(ONE, jax.devices()[:1]), mesh_cfg=ONE)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    cfg = EXPORT_MODELS["moe_mixed"]
    sigmoid = dataclasses.replace(cfg, moe=MoEConfig(num_experts=8, top_k=2, d_expert=16,
                                                     router=RouterConfig(score="sigmoid")))
    with pytest.raises(ConfigError, match="model.moe.router.score='sigmoid'"):
        H.export_hf(sigmoid, {}, str(tmp_path / "x"))


def test_cli_import_then_export(hf_models, tmp_path):
    d, ref = hf_models["next_shared"]
    write_tokenizer(d)  # a side file travels both ways
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    H.main(["import", d, "--out", work, "--mesh", "data=1"])
    saved = json.load(open(os.path.join(work, "config.json")))
    assert saved["data"]["tokenizer"].endswith("hf/tokenizer.json")
    H.main(["export", work, "--out", out])
    a, b = _tensors(d), _tensors(out)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(TOKENS)).logits.numpy(), ref)


def test_workdir_import_without_tokenizer_needs_byte_sized_vocab(hf_models, tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json and vocab_size=96"):
        H.import_to_workdir(hf_models["qwen3_mqa_untied"][0], str(tmp_path / "w"), mesh_cfg=ONE)


def test_cli_import_caps_seq_len_at_a_short_model_context(hf_models, tmp_path):
    """A Qwen3-MoE whose context (64) is shorter than the default data.seq_len imports through the
    CLI into a WORKDIR whose config fits the model (data.seq_len capped at 64) and loads back."""
    d = str(tmp_path / "short")
    shutil.copytree(hf_models["moe_dense0_nonorm"][0], d)
    with open(os.path.join(d, "config.json")) as f:
        hf_cfg = json.load(f)
    hf_cfg["max_position_embeddings"] = 64
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    write_tokenizer(d)
    work = str(tmp_path / "work")
    H.main(["import", d, "--out", work, "--mesh", "data=1"])
    with open(os.path.join(work, "config.json")) as f:
        cfg = Config.from_dict(json.load(f))
    assert cfg.model.max_seq_len == 64 and cfg.data.seq_len == 64
    assert cfg.data.tokenizer.endswith("hf/tokenizer.json")
