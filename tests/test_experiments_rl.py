"""The issue #14 RL experiments end to end at their cpu-smoke presets (grpo's shapes, so the
compiled programs are shared with tests of experiments.grpo): experiments.prefix_rft (its SFT-only
and Prefix-RFT arms; every arm's config checked) and experiments.cancellation (its RBB arm with the
flip table and the coupling probe; every arm's config checked); the report contents; and the TPU
AOT compile of Prefix-RFT's rows when libtpu is installed."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from experiments import cancellation, prefix_rft

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


# The smoke runs take the fewest arms with distinct code paths: prefix_rft's sft_only (the
# evaluation-only runner) and prefix_rft (prefix rollouts); rft and sft_rft are grpo's runner
# (tests/test_rl_trainer.py) with other step counts (test_prefix_rft_arms_match_their_budgets).
PREFIX_SMOKE_ARMS = ("sft_only", "prefix_rft")


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    """sft_only and prefix_rft at cpu-smoke (one shared SFT start) -> (workdir, report text)."""
    wd = tmp_path_factory.mktemp("prefix_rft")
    prefix_rft.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd),
                     "--arms", ",".join(PREFIX_SMOKE_ARMS)])
    return wd, (wd / "report.md").read_text()


# cancellation's arms share one runner and differ only in rl.minibatch_sampler / rl.positive_only,
# whose mechanisms tests/test_rl_wire.py and tests/test_rl_methods.py check: one arm (the sampler
# that needs mixed groups) proves the pipeline; test_cancellation_arms_build checks every arm.
CANCEL_SMOKE_ARMS = ("reward_balanced",)


@pytest.fixture(scope="module")
def cancel_run(tmp_path_factory):
    """The reward_balanced cancellation arm at cpu-smoke -> (workdir, report text)."""
    wd = tmp_path_factory.mktemp("cancellation")
    cancellation.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd),
                       "--arms", ",".join(CANCEL_SMOKE_ARMS)])
    return wd, (wd / "report.md").read_text()


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prefix_rft_arms_match_their_budgets():
    """sft_rft trades half the RL steps for SFT steps at equal optimizer updates; prefix_rft has
    rft's rollouts per step (half the prompts x 2 variants) and the spec's loss."""
    from moejax import experiment
    for name, preset in prefix_rft.PRESETS.items():
        arms = prefix_rft.arms_for(preset)
        cfg = {a: experiment.build_config(prefix_rft.PRESETS, arms, name, a, []) for a in arms}

        def updates(c):
            return c.rl.sft.steps + c.train.steps * c.rl.updates_per_step
        assert updates(cfg["sft_rft"]) == updates(cfg["rft"]), name
        assert cfg["sft_rft"].rl.sft.steps > cfg["rft"].rl.sft.steps, name
        p = cfg["prefix_rft"].rl
        assert p.prefix.enabled and p.rows_per_step == cfg["rft"].rl.rows_per_step, name
        assert (p.loss.agg, p.loss.dr_grpo_form, p.advantage.estimator) == (
            "dr_grpo", "verl", "dr_grpo")
        assert p.prefix.high.n_steps == cfg["prefix_rft"].train.steps
        assert cfg["sft_rft"].train.steps == max(cfg["rft"].train.steps // 2, 1), name
        assert not cfg["rft"].rl.prefix.enabled and not cfg["sft_rft"].rl.prefix.enabled, name


def test_prefix_rft_smoke_report(prefix_run):
    """Every arm reports pass@1 in/out of distribution; the Prefix-RFT arm trained with prefix
    tokens in its responses (share logged every step, > 0) and sft_only ran no RL step."""
    wd, text = prefix_run
    for arm in PREFIX_SMOKE_ARMS:
        assert f"| {arm} |" in text, arm
    assert "pass@1 % OOD" in text and "prefix-token share" in text
    assert "plots/prefix_rft_curves.png" in text
    assert (wd / "plots" / "prefix_rft_curves.png").exists()
    assert "## Data budget" in text
    recs = _metrics(wd / "prefix_rft" / "metrics.jsonl")
    shares = [r["prefix/token_share"] for r in recs if "prefix/token_share" in r]
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)
    assert all("rl/entropy" in r for r in recs if "rl/reward" in r)
    sft_only = _metrics(wd / "sft_only" / "metrics.jsonl")
    assert [r["step"] for r in sft_only] == [0] and "rl/pass@1/add-d4" in sft_only[0]
    assert not any("prefix/token_share" in r for r in sft_only)


def test_cancellation_smoke_report(cancel_run):
    """Every arm's diagnostics cover each RL step; on steps with mixed rewards the flip shares
    are proportions with B + S <= 1 for each sign, some tokens flip (0 < F < 1) and the update
    shares sum to 1; the coupling probe recovered h
    (residual tiny) and counted pairs; the report shows all tables and the coupling plot."""
    wd, text = cancel_run
    for arm in CANCEL_SMOKE_ARMS:
        recs = cancellation.read_diagnostics(wd / arm)
        assert [r["step"] for r in recs] == [0, 1, 2], arm
        mixed = [r for r in recs if r["flips"]["all"]["n+"] and r["flips"]["all"]["n-"]]
        assert mixed, f"{arm}: no step with both positive and negative rollouts"
        for r in mixed:
            f = r["flips"]["all"]
            assert 0 < f["F"] < 1, arm  # some tokens move against their rollout's sign
            for sign in "+-":
                b, s = f[f"B{sign}"], f[f"S{sign}"]
                if f[f"n{sign}"]:
                    assert 0 <= b <= 1 and 0 <= s <= 1 and b + s <= 1 + 1e-12
            assert sum(r["update_share"]) == pytest.approx(1.0)
        for r in recs:
            assert sum(r["token_share"]) == pytest.approx(1.0)
        c = recs[0]["coupling"]
        assert recs[0]["coupling_h_residual"] < 1e-3
        assert sum(c["same"]["count"]) + sum(c["different"]["count"]) == 128 * 127 // 2
        assert f"| {arm} | all |" in text
    assert "## Flip table" in text and "## Where updates land" in text
    assert (wd / "plots" / "coupling.png").exists()


def test_cancellation_arms_build():
    """Every arm of every preset builds a valid config that the diagnostics accept (pi_old
    recomputed, one epoch), with its own sampler / positive-only setting on grpo's advantages;
    the cpu-smoke model initialises abstractly."""
    from flax import nnx

    from moejax import experiment
    from moejax.model import Model
    want = {"shuffled": ("shuffled", False), "query_preserved": ("query_preserved", False),
            "reward_balanced": ("reward_balanced", False), "positive_only": ("shuffled", True)}
    assert set(cancellation.ARMS) == set(want)
    for name in cancellation.PRESETS:
        for arm, (sampler, positive_only) in want.items():
            rl = experiment.build_config(cancellation.PRESETS, cancellation.ARMS, name, arm, []).rl
            assert (rl.minibatch_sampler, rl.positive_only) == (sampler, positive_only), (name, arm)
            assert rl.advantage.estimator == "grpo" and rl.mini_batches > 1, (name, arm)
            assert (rl.old_logprobs, rl.ppo_epochs) == ("recompute", 1), (name, arm)
    smoke = cancellation.PRESETS["cpu-smoke"]
    assert smoke.rl.reward.format_coef > 0  # the smoke run's mixed groups come from the bonus
    model = nnx.eval_shape(lambda: Model(smoke.model, rngs=nnx.Rngs(0)))
    assert smoke.model.num_params() == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_token_classes_split_format_reasoning_and_answer():
    """Digits after the last '=' of the response are the answer, other digits the scratchpad,
    everything else (newline, operators, '=', EOS) format; prompt positions follow the mask."""
    from moejax.data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    text = "Q: 12+3=\n2+3=5\n12+3=15"  # the demonstrations' form: steps, then the final line
    ids = np.array([tok.encode(text) + [tok.eos_id]])
    mask = np.zeros_like(ids, bool)
    mask[0, len("Q: 12+3="):] = True
    got = cancellation.token_classes(ids, mask, tok)[0][mask[0]]
    want = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 2, 2, 0]  # ... 1 2 + 3 = 1 5 eos
    assert got.tolist() == want


def test_unembedding_grads_match_finite_differences():
    """The probe's per-token gradient equals central finite differences (float64) of
    log softmax(h W.T)[y] w.r.t. W, with h recovered from the logits (random h, W; vocab > d)."""
    rng = np.random.default_rng(0)
    V, D, M, eps = 11, 4, 5, 1e-6
    w, h = rng.normal(size=(V, D)), rng.normal(size=(M, D))
    y = rng.integers(V, size=M)
    grads, p, residual = cancellation.unembedding_grads(h @ w.T, y, w)

    def logp(W, i):
        z = h[i] @ W.T
        return z[y[i]] - np.log(np.exp(z).sum())
    for i in range(M):
        ref = np.zeros((V, D))
        for a in range(V):
            for b in range(D):
                d = np.zeros((V, D))
                d[a, b] = eps
                ref[a, b] = (logp(w + d, i) - logp(w - d, i)) / (2 * eps)
        np.testing.assert_allclose(grads[i].reshape(V, D), ref, atol=1e-7)
    z = h @ w.T
    np.testing.assert_allclose(p, np.exp(z[np.arange(M), y]) / np.exp(z).sum(1), rtol=1e-12)
    assert residual < 1e-12


def _prefix_smoke_config(*overrides):
    from moejax import experiment
    arms = prefix_rft.arms_for(prefix_rft.PRESETS["cpu-smoke"])
    return experiment.build_config(prefix_rft.PRESETS, arms, "cpu-smoke", "prefix_rft",
                                   list(overrides))


def test_aot_rl_rows_are_the_trainers_prefix_rows():
    """``aot.rl_rows`` of a Prefix-RFT config has the keys, shapes and dtypes of the rows the
    trainer feeds its policy programs (``rl_batch`` of prefix rollouts: prefix_mask [n,T] and
    entropy_mask_ratio [n] included)."""
    from moejax import aot
    from moejax.mesh import make_mesh
    from moejax.rl.rows import Rollouts, rl_batch
    cfg = _prefix_smoke_config()
    n = 8
    S = cfg.rl.rollout.max_prompt_len + cfg.rl.rollout.max_new_tokens
    z = np.zeros((n, S - 1), np.float32)
    r = Rollouts(tokens=np.zeros((n, S), np.int32), prompt_lengths=np.full(n, 4),
                 completion_lengths=np.full(n, 3), finished=np.ones(n, bool),
                 completion_mask=z > 0, logprobs=z, routing=None, routing_valid=None,
                 rewards=np.zeros(n, np.float32), correct=np.zeros(n, bool), tiers=["t"] * n,
                 prefix_mask=z > 0)
    rows = rl_batch(r, np.zeros(n, np.float32), z, None, None, entropy_mask_ratio=0.8)
    abstract = aot.rl_rows(cfg, make_mesh(cfg.mesh), n, ref=False, forced=False)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in rows.items()} == {
        k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()}


@pytest.mark.optimized  # judged as the real TPU compile (tests/conftest.py)
@pytest.mark.skipif(not HAVE_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_prefix_rft_rl_programs_compile_for_tpu():
    """moejax.aot compiles Prefix-RFT's RL step for v5e:2x2 at the cpu-smoke shapes: the rollout
    over prompts_per_step x num_prefix prompt rows (the trainer's variant rows), the pi_old
    recompute and the update with the prefix rows."""
    from moejax import aot
    from moejax.mesh import make_mesh
    cfg = _prefix_smoke_config("mesh.data=4")
    mesh = make_mesh(cfg.mesh, aot.topology_devices("v5e:2x2"))
    progs = aot.build_rl_programs(cfg, mesh, eval_rollout=False)
    assert set(progs) == {"rollout", "logprobs", "update"}
    rl = cfg.rl
    assert progs["rollout"].work.rows == rl.prompts_per_step * rl.prefix.num_prefix
    assert progs["rollout"].work.decode_rows == rl.rows_per_step
    assert progs["update"].work.rows == rl.rows_per_step // rl.mini_batches
