"""Evaluation: the held-out set is capped at what each domain's split holds (no all-padding
batches), every statistic is token-weighted across batches (checked against float64 sums of
per-batch forwards), and the micro-batched eval forward adds up to the one-shot forward."""

import jax
import numpy as np
import pytest

from moejax import train as T
from moejax.config import MeshConfig
from moejax.config_moe import MoEConfig
from moejax.data import prepare_data
from moejax.testing import tiny_config
from moejax.trainer import Trainer

EVAL_BATCHES = 3  # more than the 'prose' split holds at batch 8 (10 rows: 2 batches, one padded)


def _cfg(data_cache, **train):
    return tiny_config(mesh=MeshConfig(data=4, tensor=2), data={"cache_dir": data_cache},
                       model={"moe": MoEConfig(num_experts=4, top_k=2, d_expert=32)},
                       train={"eval_batches": EVAL_BATCHES, **train})


@pytest.fixture(scope="module")
def data(data_cache):
    cfg = _cfg(data_cache)
    return prepare_data(cfg.data, vocab_size=cfg.model.vocab_size)


def _rows_by_hand(n_tokens: int, seq_len: int) -> int:
    """Windows at w*seq_len (stride seq_len) that hold at least one target token."""
    return sum(1 for w in range(n_tokens) if w * seq_len + 1 < n_tokens)


def test_eval_batches_stop_at_the_end_of_the_split(data):
    T_, B = data.cfg.seq_len, 8
    for dom in data.domains:
        store = data.stores[(dom, "val")]
        rows = _rows_by_hand(store.num_tokens, T_)
        full = -(-rows // B)
        assert data.num_eval_rows(dom) == rows
        vals = data.eval_batches(dom, num_batches=full + 3, global_batch=B)
        assert len(vals) == full  # only real batches, however many were asked for
        assert all(b["loss_mask"].sum() > 0 for b in vals)
        assert (vals[-1]["segment_ids"][(rows - 1) % B] != 0).any()  # the last real row
        assert (vals[-1]["segment_ids"][(rows - 1) % B + 1:] == 0).all()  # then padding rows
        # every target of the stream is predicted once, minus the document boundaries
        assert sum(b["loss_mask"].sum() for b in vals) == store.num_tokens - 1 - (len(store) - 1)
        assert len(data.eval_batches(dom, num_batches=1, global_batch=B)) == 1
        halves = [data.eval_batches(dom, full + 3, B, process_index=p, process_count=2)
                  for p in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == full  # every process: the same batch count
        for k in range(full):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][k]["inputs"], halves[1][k]["inputs"]]), vals[k]["inputs"])
    assert data.num_eval_batches("prose", B) < EVAL_BATCHES  # the test below has a capped domain


@pytest.fixture(scope="module")
def trainer(data_cache, tmp_path_factory):
    return Trainer(_cfg(data_cache), str(tmp_path_factory.mktemp("eval")), progress=False)


@pytest.fixture(scope="module")
def state(trainer):
    return T.init_state(trainer.setup)


@pytest.fixture(scope="module")
def evaluated(trainer, state):
    return trainer.evaluate(state)


def _one_shot_forward(s: T.Setup):
    """The whole batch in one forward: per-token loss [B, T] and the router's mean top-k score
    over the batch's non-padding tokens [L_moe]."""
    def fwd(state, batch):
        with T.tracing_mesh(s):
            ce, aux = T.token_losses(s.model(state), batch)
        return ce, aux["router/topk_score_sum"]
    return jax.jit(fwd)


def test_eval_statistics_are_token_weighted(trainer, state, evaluated, data):
    """float64 sums over per-batch forwards, divided once; the padded tail batch of 'prose' weighs
    by its 2 real rows, not as a whole batch."""
    fwd = _one_shot_forward(trainer.setup)
    loss_sum, tokens = {}, {}
    score_sum, routed = 0.0, 0.0
    batches = {d: data.eval_batches(d, EVAL_BATCHES, 8) for d in data.domains}
    assert len(trainer._eval_batches) == sum(len(v) for v in batches.values())
    for d, bs in batches.items():
        for b in bs:
            ce, score = jax.device_get(fwd(state, T.global_batch(trainer.mesh, b)))
            mask = b["loss_mask"].astype(np.float64)
            loss_sum[d] = loss_sum.get(d, 0.0) + float((ce * mask).sum())
            tokens[d] = tokens.get(d, 0.0) + float(mask.sum())
            n = float((b["segment_ids"] != 0).sum())
            score_sum, routed = score_sum + np.asarray(score, np.float64) * n, routed + n
    score = score_sum / routed
    assert score.shape == (2,)
    for i, s in enumerate(score):
        np.testing.assert_allclose(evaluated[f"val/topk_score_sum/layer{i}"], s, rtol=1e-5)
    for d in data.domains:
        assert evaluated[f"val/tokens/{d}"] == tokens[d] > 0
        np.testing.assert_allclose(evaluated[f"val/loss/{d}"], loss_sum[d] / tokens[d], rtol=1e-5)
    np.testing.assert_allclose(evaluated["val/loss"],
                               sum(loss_sum.values()) / sum(tokens.values()), rtol=1e-5)


def _scan_lengths(jitted, *args) -> list[int]:
    """Lengths of the scans at the top level of a jitted function (the micro-batch loop)."""
    outer = jax.make_jaxpr(jitted)(*args).eqns
    inner = next(e.params["jaxpr"] for e in outer if "jaxpr" in e.params).jaxpr
    return [e.params["length"] for e in inner.eqns if e.primitive.name == "scan"]


def test_micro_batched_eval_equals_one_shot(trainer, state, data_cache, tmp_path):
    """With train.grad_accum=2 the eval forward runs in 2 micro-batches (4 rows over 4 batch
    shards); its sums equal the one-shot forward's (grad_accum=1), padded tail batch included."""
    micro = Trainer(_cfg(data_cache, grad_accum=2), str(tmp_path), progress=False)
    b0 = trainer._eval_batches[0]
    assert _scan_lengths(micro.eval_step, state, b0) == [2]  # 2 forwards of 4 rows, not 1 of 8
    for b in trainer._eval_batches[EVAL_BATCHES:EVAL_BATCHES + 2]:  # prose: full, then padded
        ref = jax.device_get(trainer.eval_step(state, b))
        got = jax.device_get(micro.eval_step(state, b))
        assert set(got) == set(ref) == {"loss_sum", "tokens", "domain_counts", "topk_score_sum",
                                        "router_tokens"}
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
