"""The RL loop: SFT rows mask the prompt; an interrupted RL run resumes bit-identically (rollouts,
rewards, losses, the reference model and the prompt cursor); the grpo experiment runs its arms
end to end (dense and MoE with R3) and writes a report with pass@1 per tier."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moejax.config import ConfigError, DataConfig, MeshConfig, TrainConfig
from moejax.data.tokenizer import ByteTokenizer
from moejax.rl import sft as sft_lib
from moejax.rl import tasks
from moejax.rl.config import RLConfig, RLRunConfig, SFTConfig
from moejax.rl.losses import PolicyLossConfig
from moejax.rl.rollout import RolloutConfig
from moejax.rl.trainer import RLTrainer
from moejax.testing import tiny_model

TASKS = tasks.TaskConfig(families=("add",), digits=(1,))


def small_rl(steps: int = 4, **rl) -> RLRunConfig:
    base = dict(tasks=TASKS, rollout=RolloutConfig(max_prompt_len=12, max_new_tokens=12),
                prompts_per_step=4, num_generations=2, mini_batches=1, eval_every=100,
                eval_items_per_tier=2, eval_samples=0,
                sft=SFTConfig(steps=2, batch_size=8, eval_items=8, scratchpad=False),
                loss=PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01))
    base.update(rl)
    return RLRunConfig(model=tiny_model(vocab_size=259, max_seq_len=32), mesh=MeshConfig(),
                       data=DataConfig(seq_len=23),
                       train=TrainConfig(steps=steps, lr=1e-3, warmup_steps=0, log_every=1,
                                         ckpt_every=100, async_ckpt=False, batch_size=8),
                       rl=RLConfig(**base))


def test_demo_rows_mask_the_prompt_and_keep_the_eos():
    cfg = small_rl()
    tok = ByteTokenizer()
    item = tasks.train_item(TASKS, 0)
    row = sft_lib.demo_row(item, tok, 24, scratchpad=False, chat_template=None)
    prompt = [tok.bos_id] + tok.encode(item.prompt)
    answer = tok.encode(tasks.demonstration(item, False)) + [tok.eos_id]
    n = len(prompt) + len(answer)
    want_targets = (prompt + answer)[1:]
    np.testing.assert_array_equal(row["targets"][:n - 1], want_targets)
    loss_at = np.flatnonzero(row["loss_mask"])
    # the loss covers exactly the targets that are answer tokens (eos included)
    np.testing.assert_array_equal(loss_at, np.arange(len(prompt) - 1, n - 1))
    np.testing.assert_array_equal(row["segment_ids"], (np.arange(23) < n).astype(np.int32))
    with pytest.raises(ConfigError, match="rl.rollout.max_new_tokens"):
        sft_lib.demo_row(item, tok, 6, scratchpad=False, chat_template=None)
    batches = sft_lib.DemoData(cfg, tok).eval_batches("demo", 10, 8)
    assert len(batches) == 1 and batches[0]["inputs"].shape == (8, 23)


def _records(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in recs]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A 4-step run straight through -> (workdir, summary): the resume test's reference and the
    finished run the refusal test reopens with other settings (one run for both)."""
    wd = tmp_path_factory.mktemp("straight")
    return wd, RLTrainer(small_rl(4), wd, progress=False).run()


def test_interrupted_rl_run_resumes_bit_identically(straight_run, tmp_path):
    straight_dir, straight = straight_run
    def interrupt_after_2(trainer, step, metrics):  # as a SIGTERM would: finish, save, return
        if step == 2:
            trainer.stop.requested = True

    first = RLTrainer(small_rl(4), tmp_path / "resumed", progress=False,
                      on_step=interrupt_after_2).run()
    assert first["step"] == 2 and first["preempted"]
    resumed = RLTrainer(small_rl(4), tmp_path / "resumed", progress=False).run()
    assert resumed["step"] == 4 and resumed["prompts_seen"] == straight["prompts_seen"] == 16
    a, b = _records(straight_dir), _records(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra == rb, (ra["step"], {k: (ra.get(k), rb.get(k)) for k in ra if ra.get(k) != rb.get(k)})
    # the KL and entropy terms move the policy every step, so later rollouts depend on the update
    assert all(r["rl/grad_norm"] > 0 and r["rl/kl"] >= 0 for r in a[1:])
    assert a[4]["rl/kl"] > 0


def test_a_finished_run_with_other_settings_is_refused(straight_run):
    """The straight run's workdir (finished, 4 steps) reopened with another KL coefficient."""
    straight_dir, _ = straight_run
    changed = dataclasses.replace(small_rl(4), rl=dataclasses.replace(
        small_rl(4).rl, loss=PolicyLossConfig(kl_coef=0.2, entropy_coef=0.01)))
    with pytest.raises(ConfigError, match="rl.loss.kl_coef"):
        RLTrainer(changed, straight_dir, progress=False).run()


def test_grpo_experiment_smoke_moe_with_and_without_r3(tmp_path):
    from experiments import grpo

    # one RL step per arm (the preset's 3 add nothing checked here): the evaluations at step 0
    # and at the final step, the update's routing metrics and the shared SFT stage are all there;
    # checkpoints and SFT evaluations only at the end (the preset's cadence is every step)
    out = grpo.main(["--preset", "cpu-smoke", "--arms", "moe_grpo_r3,moe_grpo",
                     "--workdir", str(tmp_path), "--set", "train.steps=1",
                     "--set", "train.ckpt_every=100", "--set", "train.eval_every=100"])
    assert set(out) == {"moe_grpo_r3", "moe_grpo"}
    report = (tmp_path / "report.md").read_text()
    assert "| moe_grpo |" in report and "| moe_grpo_r3 |" in report and "## Data budget" in report
    recs = _records(tmp_path / "moe_grpo")
    assert any(k.startswith("rl/route_disagree/layer") for k in recs[-1])
    r3 = _records(tmp_path / "moe_grpo_r3")
    assert not any(k.startswith("rl/route_disagree") for k in r3[-1])
    assert {"rl/pass@1/add-d2", "rl/greedy/add-d4"} <= set(r3[0])
    # arms of one model share one SFT stage
    assert len(list(tmp_path.glob("_sft-*"))) == 1


def test_rl_starts_from_the_sft_checkpoint(tmp_path):
    import jax

    from moejax import train as T
    from moejax.ckpt import latest_params
    from moejax.mesh import make_mesh
    from moejax.rl.trainer import latest_policy_state

    cfg = small_rl(1)
    sft_lib.run_sft(cfg, tmp_path, ByteTokenizer(), progress=False)
    setup = T.setup(cfg, make_mesh(cfg.mesh))
    start = latest_policy_state(setup, tmp_path)
    saved = latest_params(tmp_path, setup.abstract_state)
    fresh = T.init_state(setup)
    for a, b, c in zip(jax.tree.leaves(start.params), jax.tree.leaves(saved),
                       jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(c))
               for a, c in zip(jax.tree.leaves(start.params), jax.tree.leaves(fresh.params)))
    assert int(start.step) == 0
    assert all(float(np.abs(np.asarray(x)).max()) == 0 for x in jax.tree.leaves(start.opt_state)
               if np.asarray(x).dtype.kind == "f")


@pytest.mark.slow
def test_grpo_from_an_imported_hf_checkpoint(tmp_path):
    import torch
    import transformers

    from experiments import grpo

    src = str(tmp_path / "qwen3")
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True,
        max_position_embeddings=128)).save_pretrained(src)
    wd = tmp_path / "rl"
    out = grpo.main(["--source", src, "--preset", "cpu-smoke", "--arms", "grpo",
                     "--workdir", str(wd), "--set", "train.steps=1"])
    assert out["grpo"]["step"] == 1
    arm = json.loads((wd / "grpo" / "config.json").read_text())
    assert (arm["model"]["d_model"], arm["model"]["vocab_size"]) == (48, 300)  # the source's model


def test_rl_on_a_users_task_file(tmp_path):
    rows = [{"prompt": f"Q: {a}+{b}=", "answer": a + b} for a in range(6) for b in range(6)]
    path = tmp_path / "mytasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_rl(1, task_file=str(path), tasks=tasks.TaskConfig(eval_fraction=0.25))
    out = RLTrainer(cfg, tmp_path / "run", progress=False).run()
    assert out["step"] == 1 and 0.0 <= out["rl/greedy/file:mytasks"] <= 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1+1="}\n')
    with pytest.raises(ConfigError, match="rl.task_file.*line 1.*answer"):
        RLTrainer(small_rl(1, task_file=str(bad)), tmp_path / "bad", progress=False)
