"""Config validation: every invalid config fails at construction with its own clear message."""

import dataclasses
import json

import pytest

from moejax.config import (AttentionConfig, BalanceConfig, Config, ConfigError, DataConfig,
                           MeshConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig)
from moejax.overrides import apply_overrides
from moejax.testing import tiny_config, tiny_model

# (builder, substring that must appear in the message: the field and the fix)
INVALID = {
    "kv_heads_not_dividing": (lambda: AttentionConfig(num_heads=4, num_kv_heads=3),
                              "model.attention.num_kv_heads=3"),
    "zero_heads": (lambda: AttentionConfig(num_heads=0), "model.attention.num_heads=0"),
    "zero_head_dim": (lambda: AttentionConfig(head_dim=0), "model.attention.head_dim=0"),
    "rope_fraction_zero": (lambda: AttentionConfig(rope_fraction=0.0), "must lie in (0, 1]"),
    "rope_odd_rotary_dim": (lambda: AttentionConfig(head_dim=10, rope_fraction=0.5),
                            "must be an even integer"),
    "rope_theta_negative": (lambda: AttentionConfig(rope_theta=-1.0), "model.attention.rope_theta"),
    "attention_impl_unknown": (lambda: AttentionConfig(impl="flash3"), "model.attention.impl"),
    "vocab_zero": (lambda: ModelConfig(vocab_size=0), "model.vocab_size=0"),
    "layers_zero": (lambda: ModelConfig(num_layers=0), "model.num_layers=0"),
    "d_ff_negative": (lambda: ModelConfig(d_ff=-4), "model.d_ff=-4"),
    "norm_unknown": (lambda: ModelConfig(norm="layernorm"), "model.norm='layernorm'"),
    "dtype_unknown": (lambda: ModelConfig(dtype="float8"), "model.dtype='float8'"),
    "remat_unknown": (lambda: ModelConfig(remat="some"), "model.remat='some'"),
    "eps_zero": (lambda: ModelConfig(norm_eps=0.0), "model.norm_eps=0.0"),
    "mesh_two_fill_axes": (lambda: MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
    "mesh_zero_axis": (lambda: MeshConfig(tensor=0), "mesh.tensor=0"),
    "mixture_length": (lambda: DataConfig(mixture=(1.0, 1.0)), "give one weight per domain"),
    "mixture_all_zero": (lambda: DataConfig(mixture=(0.0, 0.0, 0.0)), "not all zero"),
    "val_fraction": (lambda: DataConfig(val_fraction=0.7), "data.val_fraction=0.7"),
    "duplicate_domain": (lambda: DataConfig(domains=("code", "code", "math")), "each domain once"),
    "bpe_vocab_small": (lambda: DataConfig(tokenizer="bpe", bpe_vocab_size=100),
                        "data.bpe_vocab_size=100"),
    "accum_not_dividing": (lambda: TrainConfig(batch_size=16, grad_accum=3), "train.grad_accum=3"),
    "warmup_beyond_steps": (lambda: TrainConfig(steps=10, warmup_steps=20), "train.warmup_steps=20"),
    "lr_zero": (lambda: TrainConfig(lr=0.0), "train.lr=0.0"),
    "nan_policy_unknown": (lambda: TrainConfig(nan_policy="ignore"), "train.nan_policy='ignore'"),
    "clip_negative": (lambda: TrainConfig(clip_norm=-1.0), "train.clip_norm=-1.0"),
    "seq_beyond_max": (lambda: tiny_config(data={"seq_len": 256}), "data.seq_len=256"),
    "vocab_too_small_for_bytes": (lambda: tiny_config(model={"vocab_size": 200}),
                                  "must be >= 259 for the byte tokenizer"),
    "batch_not_divisible_by_mesh": (lambda: tiny_config(mesh=MeshConfig(data=3, fsdp=1),
                                                        train={"batch_size": 8}),
                                    "divisible by mesh data*fsdp*expert=3"),
    "heads_not_divisible_by_tensor": (lambda: tiny_config(
        mesh=MeshConfig(data=1, tensor=8), model={"attention": {"num_heads": 4}}),
        "model.attention.num_heads=4 is invalid: must be divisible by mesh.tensor=8"),
    "d_model_not_divisible_by_fsdp": (lambda: tiny_config(
        mesh=MeshConfig(data=1, fsdp=8), model={"d_model": 60}, train={"batch_size": 8}),
        "model.d_model=60 is invalid: must be divisible by mesh.fsdp=8"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_fails_with_named_field(name):
    build, expected = INVALID[name]
    with pytest.raises(ConfigError) as e:
        build()
    assert expected in str(e.value), str(e.value)


def test_invalid_messages_are_distinct():
    messages = set()
    for build, _ in INVALID.values():
        with pytest.raises(ConfigError) as e:
            build()
        messages.add(str(e.value))
    assert len(messages) == len(INVALID) >= 20


def test_mesh_resolve_fills_and_checks_device_count():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="multiply to 6 but 8 devices"):
        MeshConfig(data=3, tensor=2).resolve(8)
    with pytest.raises(ConfigError, match="does not divide the 8 available devices"):
        MeshConfig(data=-1, tensor=3).resolve(8)


def test_overrides_parse_types_and_revalidate():
    cfg = tiny_config()
    out = apply_overrides(cfg, ["train.lr=1e-4", "data.mixture=3,1,1", "model.attention.qk_norm=False",
                                "train.nan_policy=stop"])
    assert out.train.lr == 1e-4 and out.data.mixture == (3.0, 1.0, 1.0)
    assert out.model.attention.qk_norm is False and out.train.nan_policy == "stop"
    assert out.model.d_model == cfg.model.d_model  # untouched fields keep the preset's values
    with pytest.raises(ConfigError, match="train.lr=-1.0 is invalid"):
        apply_overrides(cfg, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="has no field 'nope'"):
        apply_overrides(cfg, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(cfg, ["train.lr"])
    with pytest.raises(ConfigError, match="invalid choice 'bogus'"):
        apply_overrides(cfg, ["train.nan_policy=bogus"])


def test_overrides_of_one_section_are_checked_together_and_the_last_value_wins():
    """Two fields that are only valid together (1 expert, top-1) pass in one --set list (one
    rebuild of the section, not one per field); a key given twice keeps its last value; a value
    may start with '-'; a section itself is not a value."""
    cfg = tiny_config(model={"moe": MoEConfig(num_experts=8, top_k=2)})
    with pytest.raises(ConfigError, match="top_k"):
        apply_overrides(cfg, ["model.moe.top_k=4", "model.moe.num_experts=2"])
    out = apply_overrides(cfg, ["model.moe.num_experts=1", "model.moe.top_k=1",
                                "train.lr=1e-3", "train.lr=2e-3", "data.seed=-3",
                                "data.cache_dir=-cache"])
    assert (out.model.moe.num_experts, out.model.moe.top_k, out.train.lr) == (1, 1, 2e-3)
    assert out.data.seed == -3 and out.data.cache_dir == "-cache"
    assert out.model.d_model == cfg.model.d_model
    assert out.model.moe.router == cfg.model.moe.router and out.mesh == cfg.mesh
    with pytest.raises(ConfigError, match="is a config section"):
        apply_overrides(cfg, ["model.moe=1"])
    with pytest.raises(ConfigError, match="invalid override train.steps='1.5'"):
        apply_overrides(cfg, ["train.steps=1.5"])


@pytest.mark.parametrize("spelling, value", [
    ("True", True), ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("False", False), ("false", False), ("0", False), ("no", False), ("NO", False)])
def test_boolean_overrides_accept_the_spellings_people_type(spelling, value):
    cfg = tiny_config(train={"async_ckpt": not value})
    out = apply_overrides(cfg, [f"model.attention.qk_norm={spelling}", f"train.async_ckpt={spelling}"])
    assert out.model.attention.qk_norm is value and out.train.async_ckpt is value


def test_boolean_overrides_reject_other_words():
    with pytest.raises(ConfigError, match="model.attention.qk_norm.*'maybe'.*true/false"):
        apply_overrides(tiny_config(), ["model.attention.qk_norm=maybe"])


def test_json_round_trip():
    cfg = tiny_config(data={"mixture": (2.0, 1.0, 1.0)})
    back = Config.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    bad = cfg.to_dict()
    bad["train"]["not_a_field"] = 1
    with pytest.raises(ConfigError, match="unknown config fields"):
        Config.from_dict(bad)


def test_configs_are_frozen():
    cfg = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("moe", [
    None,
    dict(num_experts=8, top_k=2, d_expert=32, num_shared_experts=1, shared_gate=True,
         first_dense_layers=1, moe_every=1, dense_layers=(2,)),
    dict(num_experts=8, top_k=2, d_expert=32, router=dict(recurrent="gru", recurrent_dim=16,
                                                          num_null_experts=2)),
])
def test_num_params_matches_the_model(moe):
    """The analytic count (used for MFU) equals the model's actual trainable parameters."""
    import math

    import jax
    from flax import nnx

    from moejax.config import MoEConfig, RouterConfig
    from moejax.model import Model
    from moejax.testing import tiny_model

    if moe is not None:
        moe = MoEConfig(**{**moe, "router": RouterConfig(**moe.get("router", {}))})
    cfg = tiny_model(num_layers=3, **({} if moe is None else {"moe": moe}))
    abstract = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    actual = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert cfg.num_params() == actual
    if moe is not None:
        assert cfg.num_params(active=True) < actual


INVALID_MOE = {
    "topk_above_experts": (lambda: MoEConfig(num_experts=4, top_k=5), "model.moe.top_k=5"),
    "unknown_router": (lambda: RouterConfig(kind="hash"), "model.moe.router.kind='hash'"),
    "unknown_scope": (lambda: BalanceConfig(scope="batch"), "model.moe.balance.scope='batch'"),
    "groups_not_dividing": (lambda: MoEConfig(num_experts=6, router=RouterConfig(
        group_mode="moge", num_groups=4)), "model.moe.router.num_groups=4"),
    "experts_vs_expert_axis": (lambda: tiny_config(mesh=MeshConfig(data=-1, expert=4),
                                                   model={"moe": MoEConfig(num_experts=6)}),
                               "must be divisible by mesh.expert=4"),
    "scan_with_mixed_layers": (lambda: tiny_model(scan_layers=True, moe=MoEConfig(
        num_experts=4, first_dense_layers=1)), "scan needs identical layers"),
    "scan_with_dense_layers": (lambda: tiny_model(scan_layers=True, moe=MoEConfig(
        num_experts=4, dense_layers=(2,))), "moe.dense_layers=()"),
    "negative_dense_layer": (lambda: MoEConfig(num_experts=4, dense_layers=(-1,)),
                             "model.moe.dense_layers=(-1,)"),
}


def test_dense_layers_follow_hf_mlp_only_layers():
    """HF Qwen3-MoE: layer l is sparse iff l not in mlp_only_layers and (l+1) % step == 0."""
    m = MoEConfig(num_experts=4, first_dense_layers=1, moe_every=2, dense_layers=(5,))
    assert [l for l in range(8) if m.is_moe_layer(l)] == [1, 3, 7]


@pytest.mark.parametrize("name", sorted(INVALID_MOE))
def test_invalid_moe_config_fails_with_named_field(name):
    build, expected = INVALID_MOE[name]
    with pytest.raises(ConfigError) as e:
        build()
    assert expected in str(e.value), str(e.value)
