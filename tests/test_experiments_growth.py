"""The growth experiments end to end on their cpu-smoke presets, on the fewest arms that cover the
pipeline (slow: CI runs them); every arm of every preset builds and initialises abstractly.

The two upcycle smokes run in one experiment workdir (``upcycle_root``): every upcycle arm grows
from one dense source run, so the second smoke reuses the first one's finished source instead of
training it again (each smoke's own checks read its arms' directories and its own report)."""

import dataclasses
import json
import os

import jax
import pytest
from flax import nnx

from experiments import gstack, upcycle
from moejax import bam_run, grow_run
from moejax import train as T
from moejax.config import ConfigError, MoEConfig
from moejax.experiment import build_config
from moejax.mesh import make_mesh
from moejax.growth import source_config
from moejax.metrics import read_metrics
from moejax.model import Model

# scratch and its seed replica drive the seed aggregation (mean ± spread); gstack the growth path
# (shared source run, grown phase, growth event, matched FLOPs). G_zero / G_random / G_learn differ
# only in the growth op: tests/test_growth.py (function preservation, the MSG ramp in a run,
# G_learn's fit)
GSTACK_SMOKE_ARMS = ("scratch", "scratch-s2", "gstack")
# dense: the identity growth (function preserving at upcycling, no heatmap); emoe64: an EMoE
# conversion on EMoE's layer choice (dense/MoE mix, avg-key routing, heatmap). copy / fine / emoe
# differ only in the upcycling op: tests/test_upcycle.py
UPCYCLE_SMOKE_ARMS = ("dense", "emoe64")
# DSMoE (a dense FFN as threshold-gated blocks, its measured active share) and BAM (branch phase,
# mixing, branch tokens in the budget): their own smoke
UPCYCLE_NEW_ARMS = ("dsmoe", "bam")


@pytest.fixture(scope="module")
def upcycle_root(tmp_path_factory) -> str:
    """One upcycle workdir for both upcycle smokes (one shared dense source run)."""
    return str(tmp_path_factory.mktemp("upcycle"))


def _abstract_params(model_cfg) -> int:
    """Parameter count of the model initialised abstractly (no compile, no memory)."""
    m = nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_gstack_seed_replicas_repeat_their_base_arm_on_seed_1():
    for arm, over in gstack.BASE_ARMS.items():
        assert gstack.ARMS[arm] == over
        assert gstack.ARMS[arm + gstack.SEED_SUFFIX] == (*over, f"train.seed={gstack.SEEDS[1]}")


@pytest.mark.parametrize("preset", sorted(gstack.PRESETS))
def test_gstack_every_arm_builds_with_matched_flops(preset):
    """Every base arm's config (and its source's) validates (the -s2 replicas add only
    train.seed); the cpu presets' target and source models initialise abstractly; each growth
    arm's source + grown FLOPs end within one step of scratch's."""
    cfgs = {arm: build_config(gstack.PRESETS, gstack.ARMS, preset, arm, [])
            for arm in gstack.BASE_ARMS}
    scratch = cfgs["scratch"]
    tokens = scratch.train.batch_size * scratch.data.seq_len
    f_scratch = scratch.model.flops_per_token(scratch.data.seq_len) * tokens * scratch.train.steps
    for arm, cfg in cfgs.items():
        assert cfg.model == scratch.model  # one target model: the arms differ in the growth op
        if cfg.growth.op == "none":
            continue
        src = source_config(cfg)
        assert src.model.num_layers == cfg.model.num_layers // cfg.growth.factor
        flops = (src.model.flops_per_token(src.data.seq_len) * tokens * src.train.steps
                 + cfg.model.flops_per_token(cfg.data.seq_len) * tokens * gstack.matched_steps(cfg))
        one_step = cfg.model.flops_per_token(cfg.data.seq_len) * tokens
        assert abs(flops - f_scratch) <= one_step, arm
    if preset.startswith("cpu"):
        for model in (scratch.model, source_config(cfgs["gstack"]).model):
            assert _abstract_params(model) == model.num_params()
    assert (cfgs["grandom"].growth.op, cfgs["grandom"].growth.new_layers) == ("random_depth", "top")
    assert (cfgs["gzero"].growth.op, cfgs["gzero"].growth.new_layer_init) == ("zero_depth", "copy")


@pytest.mark.slow
def test_gstack_smoke(data_cache, tmp_path):
    wd = str(tmp_path / "gstack")
    argv = ["--preset", "cpu-smoke", "--workdir", wd, "--arms", ",".join(GSTACK_SMOKE_ARMS),
            "--set", f"data.cache_dir={data_cache}"]
    out = gstack.main(argv)
    assert set(out) == set(GSTACK_SMOKE_ARMS) and set(gstack.BASE_ARMS) < set(gstack.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in ("scratch", "gstack"):
        assert f"| {gstack.LABELS[arm]} |" in report
    assert "| scratch | 2 |" in report and " ± " in report  # two seeds of scratch aggregated
    assert os.path.getsize(os.path.join(wd, "plots", "val_loss_vs_flops.png")) > 1000
    recs = read_metrics(os.path.join(wd, "gstack", "metrics.jsonl"))
    assert [r for r in recs if r.get("event") == "grow"]  # the grown phase follows a source run
    cfg = json.load(open(os.path.join(wd, "gstack", "config.json")))["growth"]
    assert cfg["fade_in_steps"] == 2 and cfg["op"] == "stack"
    # matched FLOPs: the growth arm ends within one step's FLOPs of scratch
    scratch = gstack.curve(os.path.join(wd, "scratch"))[0][-1]
    x = gstack.curve(os.path.join(wd, "gstack"))[0][-1]
    assert abs(x - scratch) / scratch < 0.15
    again = gstack.main(argv)  # finished arms are not rerun
    assert set(again) == set(GSTACK_SMOKE_ARMS)


def test_gstack_mean_spread_and_seed_rows():
    """Mean ± half-range by hand; each seed's speedup is against scratch of the same seed."""
    import numpy as np
    assert gstack.mean_spread([1.0, 3.0]) == "2 ± 1" and gstack.mean_spread([2.5]) == "2.5"
    assert gstack.mean_spread([None]) == "n/a"
    x = np.array([0.0, 10.0])
    curves = {"scratch": (x, np.array([5.0, 3.0]), None),
              "scratch-s2": (x, np.array([5.0, 4.0]), None),
              "gstack": (x, np.array([4.0, 2.0]), 1.0),  # reaches 3.0 at x=5: 50% saved
              "gstack-s2": (x, np.array([4.0, 2.0]), 1.0)}  # reaches 4.0 at x=0: 100% saved
    rows = gstack.seed_rows(curves)
    row = [r for r in rows if r.startswith("| G_stack |")][0]
    assert "| 2 | 2 ± 0 |" in row and "| 2.5 ± 2.5 |" in row and "| 75 ± 25 % |" in row


@pytest.mark.parametrize("preset", sorted(upcycle.PRESETS))
def test_upcycle_every_arm_builds(preset):
    """Every arm's trained config (``arm_config``) and its dense source validate; the
    models initialise abstractly (cpu-smoke only: the cpu presets differ in size); active FFN
    compute orders copy > dense > emoe64 > emoe; every arm shares one dense source; BAM has one
    expert per trained domain."""
    cfgs = {}
    for arm in upcycle.ARMS:
        if preset.startswith("tpu") and arm in ("emoe64", "bam"):
            with pytest.raises(ConfigError, match="scan_layers" if arm == "emoe64" else
                               "mesh.expert=8"):  # no dense/MoE mix; 3 experts over EP 8
                upcycle.arm_config(build_config(upcycle.PRESETS, upcycle.ARMS, preset, arm, []))
            continue
        cfgs[arm] = upcycle.arm_config(build_config(upcycle.PRESETS, upcycle.ARMS, preset, arm, []))
        assert not source_config(cfgs[arm]).model.moe.enabled
        assert (cfgs[arm].growth.branch_steps > 0) == (arm == "bam")  # only BAM reads it
        if preset == "cpu-smoke":  # the cpu presets' arms differ only in model size
            assert _abstract_params(cfgs[arm].model) == cfgs[arm].model.num_params()
    sources = {grow_run.source_workdir_for(c, "root") for c in cfgs.values()}
    assert len(sources) == 1  # one dense source run shared by every arm
    flops = {a: c.model.flops_per_token(c.data.seq_len) for a, c in cfgs.items()}
    assert flops["copy"] > flops["dense"] > flops["emoe"]
    assert flops["dsmoe"] > flops["dense"]  # every block (and the gate) counted as configured
    if "bam" in cfgs:  # N = the domains of weight > 0: 2 with math held out, else 3
        moe, n = cfgs["bam"].model.moe, 3 - preset.endswith(("ood", "smoke"))
        assert (moe.num_experts, moe.top_k, moe.d_expert) == (n, 2, cfgs["bam"].model.d_ff)
        assert cfgs["bam"].model.attention_experts == n and flops["bam"] > flops["copy"]
    if "emoe64" in flops:
        assert flops["dense"] > flops["emoe64"] > flops["emoe"]
        moe = cfgs["emoe64"].model.moe
        d_ff = cfgs["emoe64"].model.d_ff
        assert (moe.num_experts, moe.top_k, moe.d_expert) == (64, 16, d_ff // 64)
        assert moe.balance.scope == "none" and moe.router.gating == "avg_key"
    if preset == "cpu-smoke":  # 2 layers: last_half makes layer 1 the MoE layer
        moe = cfgs["emoe64"].model.moe
        assert (moe.d_expert, moe.first_dense_layers, moe.moe_every) == (4, 1, 4)


@pytest.mark.slow
def test_upcycle_smoke(data_cache, upcycle_root):
    wd = upcycle_root
    out = upcycle.main(["--preset", "cpu-smoke", "--workdir", wd,
                        "--arms", ",".join(UPCYCLE_SMOKE_ARMS),
                        "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(UPCYCLE_SMOKE_ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in UPCYCLE_SMOKE_ARMS:
        assert f"| {arm} |" in report
    assert os.path.getsize(os.path.join(wd, "plots", "heatmap_emoe64.png")) > 1000
    assert not os.path.exists(os.path.join(wd, "plots", "heatmap_dense.png"))
    for png in ("id_loss_vs_flops.png", "ood_loss_vs_flops.png"):
        assert os.path.getsize(os.path.join(wd, "plots", png)) > 1000
    assert "| ID loss | OOD loss |" in report and "never see math" in report
    sources = [d for d in os.listdir(wd) if d.startswith("_source-")]
    assert len(sources) == 1  # one dense run shared by every arm
    src_cfg = json.load(open(os.path.join(wd, sources[0], "config.json")))
    assert src_cfg["data"]["mixture"] == [1.0, 1.0, 1.0]  # the source saw every domain
    emoe64 = json.load(open(os.path.join(wd, "emoe64", "config.json")))["model"]["moe"]
    assert (emoe64["num_experts"], emoe64["top_k"], emoe64["d_expert"]) == (64, 16, 4)
    assert (emoe64["first_dense_layers"], emoe64["moe_every"]) == (1, 4)  # 2 layers: layer 1
    assert emoe64["balance"]["scope"] == "none"
    dense = json.load(open(os.path.join(wd, "dense", "config.json")))
    assert dense["data"]["mixture"] == [1.0, 1.0, 0.0]
    table = report.split("## Data budget")[0].splitlines()
    gflops = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table
              if line.startswith("| ") and line.split("|")[1].strip() in upcycle.ARMS}
    assert gflops["dense"] > gflops["emoe64"]  # active FFN
    recs = read_metrics(os.path.join(wd, "dense", "metrics.jsonl"))
    event = [r for r in recs if r.get("event") == "grow"][0]
    before = [r for r in recs if r["step"] == event["step"] and "val/loss" in r][0]
    assert event["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5)


def test_upcycle_dsmoe_active_flops_at_the_measured_share():
    """DSMoE's active FLOPs at a measured share of 1/2 = a dense model of d_ff/2 plus the gate
    [D,E] per layer (by hand); share 1 = the configured (every block) count."""
    cfg = upcycle.arm_config(build_config(upcycle.PRESETS, upcycle.ARMS, "cpu-smoke", "dsmoe", []))
    m, seq = cfg.model, cfg.data.seq_len
    recs = [{"phase": "grown", "moe/active_experts/layer0": 3.0, "moe/active_experts/layer1": 5.0},
            {"phase": "grown", "moe/active_experts/layer0": 4.0, "moe/active_experts/layer1": 4.0},
            {"phase": "source", "moe/active_experts/layer0": 8.0}]  # not the grown phase
    assert upcycle.active_share(recs, 8) == 0.5
    half = dataclasses.replace(m, d_ff=m.d_ff // 2, moe=MoEConfig()).flops_per_token(seq)
    gate = 6.0 * m.num_layers * m.d_model * 8
    assert upcycle.active_flops_per_token(cfg, recs) == pytest.approx(half + gate, rel=1e-12)
    full = [{"phase": "grown", "moe/active_experts/layer0": 8.0}]
    assert upcycle.active_flops_per_token(cfg, full) == pytest.approx(m.flops_per_token(seq))
    unlogged = [{"phase": "grown", "val/loss": 3.0}]  # no train step logged: every block counted
    assert upcycle.active_flops_per_token(cfg, unlogged) == pytest.approx(m.flops_per_token(seq))


def _stream_positions(run_dir: str) -> dict[str, int]:
    """Per-domain row positions of the data stream saved with a run's last checkpoint."""
    ckpt = os.path.join(run_dir, "ckpt")
    last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    with open(os.path.join(ckpt, str(last), "data", "process_0-of-1.json")) as f:
        return json.load(f)["mixture"]["positions"]


@pytest.mark.slow
def test_upcycle_dsmoe_and_bam_smoke(data_cache, upcycle_root):
    """dsmoe and bam on cpu-smoke: one shared source, one branch per fine-tuned domain (math held
    out) whose tokens enter BAM's budget and FLOPs curve, DSMoE's measured active share."""
    wd = upcycle_root
    argv = ["--preset", "cpu-smoke", "--workdir", wd, "--arms", ",".join(UPCYCLE_NEW_ARMS),
            "--set", f"data.cache_dir={data_cache}"]
    assert set(upcycle.main(argv)) == set(UPCYCLE_NEW_ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    assert len([d for d in os.listdir(wd) if d.startswith("_source-")]) == 1
    branches = sorted(d for d in os.listdir(wd) if d.startswith("_branch-"))
    assert [d.rsplit("-", 1)[0] for d in branches] == ["_branch-code", "_branch-prose"]
    for d, onehot in zip(branches, ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])):
        bcfg = json.load(open(os.path.join(wd, d, "config.json")))
        assert bcfg["data"]["mixture"] == onehot and bcfg["train"]["steps"] == 1
    bam = json.load(open(os.path.join(wd, "bam", "config.json")))
    moe = bam["model"]["moe"]
    assert (moe["num_experts"], moe["variant"]["kind"]) == (2, "bam")
    recs = read_metrics(os.path.join(wd, "bam", "metrics.jsonl"))
    event = [r for r in recs if r.get("event") == "grow"][0]
    step_tokens = 8 * 64  # cpu-smoke batch x seq_len
    assert event["branch_tokens"] == 2 * 1 * step_tokens  # N = 2 branches x branch_steps = 1
    assert recs[-1]["tokens"] == (2 + 2 + 3) * step_tokens  # source + branches + grown
    row = [line for line in report.splitlines() if line.startswith("| bam |")][0]
    assert f"| {2 * step_tokens:,} + {3 * step_tokens:,} |" in row
    x, _ = upcycle.grown_curve(recs, ["code", "prose"], 1.0)
    assert x[0] == event["branch_flops"] > 0  # BAM's FLOPs curve starts after its branches
    share = upcycle.active_share(read_metrics(os.path.join(wd, "dsmoe", "metrics.jsonl")), 8)
    assert 0.0 < share < 1.0 and f"measured mean active-block share {share:.3f}" in report
    assert os.path.getsize(os.path.join(wd, "plots", "heatmap_bam.png")) > 1000
    assert "- bam: code 512, prose 512 tokens (1 steps x 8 sequences per branch)" in report
    # no row is trained twice: each branch continues the source's stream on its domain (8 rows),
    # the grown phases continue after the source (and BAM's after the branches)
    src_dir = [d for d in os.listdir(wd) if d.startswith("_source-")][0]
    src = _stream_positions(os.path.join(wd, src_dir))
    for d, domain in zip(branches, ("code", "prose")):
        assert _stream_positions(os.path.join(wd, d)) == {**src, domain: src[domain] + 8}
    for arm, skipped in (("bam", 8), ("dsmoe", 0)):
        grown = _stream_positions(os.path.join(wd, arm, "grown"))
        assert grown["math"] == src["math"]  # held out
        assert all(grown[k] >= src[k] + skipped for k in ("code", "prose"))
        assert sum(grown[k] - src[k] - skipped for k in ("code", "prose")) == 3 * 8
    # the finished branches are reused by a run of the same config: nothing retrains
    before = {d: open(os.path.join(wd, d, "metrics.jsonl")).read() for d in branches}
    cfg = upcycle.arm_config(build_config(upcycle.PRESETS, upcycle.ARMS, "cpu-smoke", "bam",
                                          [f"data.cache_dir={data_cache}"]))
    src_cfg = source_config(cfg)
    src_wd = grow_run.source_workdir_for(cfg, wd)
    src_setup = T.setup(src_cfg, make_mesh(src_cfg.mesh))
    assert bam_run.run_branches(cfg, src_cfg, src_setup, src_wd, progress=False) is None
    assert {d: open(os.path.join(wd, d, "metrics.jsonl")).read() for d in branches} == before
