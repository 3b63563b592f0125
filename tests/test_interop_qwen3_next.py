"""Qwen3-Next hybrid interop against transformers: a tiny random Qwen3NextForCausalLM with Gated
DeltaNet (linear_attention) layers, gated full attention and a shared-expert MoE is built locally,
imported (unrolled, scanned, on 8 devices) and must give transformers' fp32 logits; an added MTP
module's tensors are all consumed and export round-trips them bit-exactly."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from moejax.config import MeshConfig, ModelConfig
from moejax.interop import hf as H
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model

V, B, T = 96, 4, 12
TOKENS = np.random.default_rng(0).integers(0, V, (B, T))
HF_KW = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
             layer_types=["linear_attention", "full_attention"] * 2, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
             linear_conv_kernel_dim=4, tie_word_embeddings=False)
ONE = MeshConfig(data=1)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: zero-centred norms around 0, the DeltaNet's gated norm around 1, A_log
    and dt_bias spread, routers clear-cut."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.08 * noise)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory, fp32 reference logits [B,T,V])."""
    d = str(tmp_path_factory.mktemp("qwen3_next_hybrid"))
    cfg = transformers.Qwen3NextConfig(vocab_size=V, **HF_KW)
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(d)
    with torch.no_grad():
        return d, model(torch.tensor(TOKENS)).logits.numpy()


def moejax_logits(model_cfg: ModelConfig, params: dict, mesh, mesh_cfg) -> np.ndarray:
    with use_mesh(mesh, rules_for(mesh_cfg)):
        abstract = nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(0)))
        graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(TOKENS, jnp.int32))
    return np.asarray(logits)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_hybrid_import_matches_transformers_logits(hf_model, scan):
    d, want = hf_model
    mesh = make_mesh(ONE, jax.devices()[:1])
    cfg, params, report = H.import_hf(d, mesh=mesh, mesh_cfg=ONE, scan_layers=scan)
    assert cfg.layer_types == tuple(HF_KW["layer_types"]) and cfg.deltanet.num_v_heads == 4
    assert report["consumed"] == report["tensors"] and not report["ignored"]
    assert rel_err(moejax_logits(cfg, params, mesh, ONE), want) < 1e-4


def test_hybrid_import_on_8_devices_matches(hf_model):
    d, want = hf_model
    mcfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mcfg)
    cfg, params, _ = H.import_hf(d, mesh=mesh, mesh_cfg=mcfg)
    qkvz = params["layers"][0]["attn"]["in_proj_qkvz"]
    assert qkvz.sharding.spec[1] == "tensor", qkvz.sharding  # DeltaNet heads over tensor
    assert rel_err(moejax_logits(cfg, params, mesh, mcfg), want) < 1e-4


def with_mtp(src: str, dst: str) -> dict:
    """``src`` plus a random MTP module (vLLM's Qwen3-Next names; its block shaped like the last,
    full-attention layer) in its own safetensors file -> the MTP tensors."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_num_hidden_layers"] = 1
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    main = {}
    for fn in os.listdir(src):
        if fn.endswith(".safetensors"):
            main.update(load_file(os.path.join(src, fn)))
    rng = np.random.default_rng(7)
    last = f"model.layers.{HF_KW['num_hidden_layers'] - 1}."
    D = HF_KW["hidden_size"]
    mtp = {"mtp." + "layers.0." + k[len(last):]: rng.normal(size=v.shape).astype(np.float32) * 0.1
           for k, v in main.items() if k.startswith(last)}
    mtp["mtp.fc.weight"] = rng.normal(size=(D, 2 * D)).astype(np.float32) * 0.1
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{n}.weight"] = rng.normal(size=(D,)).astype(np.float32) * 0.2
    save_file(mtp, os.path.join(dst, "mtp.safetensors"))
    return mtp


def test_mtp_import_consumes_every_tensor_and_round_trips(hf_model, tmp_path):
    d = str(tmp_path / "with_mtp")
    mtp = with_mtp(hf_model[0], d)
    mesh = make_mesh(ONE, jax.devices()[:1])
    cfg, params, report = H.import_hf(d, mesh=mesh, mesh_cfg=ONE)
    assert cfg.mtp_layers == 1
    assert report["consumed"] == report["tensors"] and not report["ignored"]
    depth = params["mtp"]["depths"][0]
    D = HF_KW["hidden_size"]
    np.testing.assert_array_equal(np.asarray(depth["fc"]).reshape(2 * D, D).T,
                                  mtp["mtp.fc.weight"])  # [embedding | hidden] halves
    np.testing.assert_array_equal(np.asarray(depth["block"]["attn"]["q"]).reshape(D, -1).T,
                                  mtp["mtp.layers.0.self_attn.q_proj.weight"])
    # the main model is unchanged by the MTP module
    assert rel_err(moejax_logits(cfg, params, mesh, ONE), hf_model[1]) < 1e-4
    out = str(tmp_path / "export")
    H.export_hf(cfg, params, out)
    got = {}
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            got.update(load_file(os.path.join(out, fn)))
    src = {}
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            src.update(load_file(os.path.join(d, fn)))
    assert set(got) == set(src)
    for k, v in src.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["layer_types"] == HF_KW["layer_types"]
    assert exported["mtp_num_hidden_layers"] == 1


def test_export_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    """The exported hybrid (config.json with layer_types and linear_* sizes) is a model
    transformers builds and runs to the source's logits."""
    d, want = hf_model
    mesh = make_mesh(ONE, jax.devices()[:1])
    cfg, params, _ = H.import_hf(d, mesh=mesh, mesh_cfg=ONE, scan_layers=True)
    out = str(tmp_path / "export")
    H.export_hf(cfg, params, out)
    model = transformers.Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
