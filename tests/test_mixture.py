"""The keyed domain mixture of the training stream (moejax.data.mixture): per-domain streams,
the weight-driven chooser, weight changes mid-run, state by domain name, process sharding, and
the trainer's mixer hook and per-domain token counts through an interrupted run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal

import numpy as np
import pytest

from moejax.config import ConfigError, DataConfig
from moejax.data import DomainStream, Mixture, MixtureIterator, prepare_data
from moejax.data.mixture import row_uniforms
from moejax.metrics import read_metrics
from moejax.testing import tiny_config
from moejax.trainer import Trainer

T, B = 32, 8
MASK64 = (1 << 64) - 1


# -- references by hand ---------------------------------------------------------------------------

def _splitmix64_by_hand(state: int, n: int) -> list[int]:
    """The first ``n`` outputs of splitmix64 from ``state`` (Python ints, the published
    algorithm)."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def _choose_by_hand(weights: list[float], u: float) -> int:
    """The domain whose interval of the normalised cumulative weights holds ``u`` (a loop)."""
    total, acc = sum(weights), 0.0
    for d, w in enumerate(weights):
        acc += w
        if u < acc / total:
            return d
    return max(d for d, w in enumerate(weights) if w > 0)


def _fake_row(name: str, start: int) -> dict:
    """A row that only says where it was read (iterator logic without token reads)."""
    return {"start": np.int64(start), "name": np.array(name)}


def _mixture(sizes: dict[str, int], weights: dict[str, float], seq_len: int = T,
             seed: int = 0) -> Mixture:
    return Mixture([DomainStream(k, n, seq_len, seed) for k, n in sizes.items()], weights, seed)


def _rows(batches) -> list[tuple[int, dict]]:
    """(domain, row) of every row of ``batches`` in order."""
    return [(int(b["domain"][j]), {k: v[j] for k, v in b.items()})
            for b in batches for j in range(len(b["domain"]))]


def _assert_streams_exact(rows, mixture: Mixture, start_of) -> None:
    """Every domain's rows, in order, are rows 0, 1, 2, ... of that domain's stream: none
    repeated or skipped whatever the weights did."""
    seen = {k: 0 for k in mixture.names}
    for d, row in rows:
        name = mixture.names[d]
        assert start_of(row) == mixture.streams[name].start(seen[name]), (name, seen[name])
        seen[name] += 1
    assert all(n > 0 for n in seen.values()), seen


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- one domain's stream --------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [T + 1, 2 * T + 1, 3 * T, 50 * T + 7, 1000 * T + 31])
def test_domain_stream_visits_every_window_once_per_epoch(num_tokens):
    s = DomainStream("code", num_tokens, T, seed=3)
    w = s.num_windows
    assert w == (1 if num_tokens < 3 * T + 1 else (num_tokens - 1) // T - 1)
    epochs = []
    for e in range(3):
        starts = np.array([s.start(e * w + k) for k in range(w)])
        phase = starts.min() % T
        assert ((starts - phase) % T == 0).all()
        assert sorted((starts - phase) // T) == list(range(w))  # a permutation of the windows
        assert starts.min() >= 0 and starts.max() + T + 1 <= num_tokens  # whole windows only
        epochs.append(starts)
    if w > 3:  # epochs are shuffled (and phased) differently
        assert not np.array_equal(epochs[0], epochs[1])
    assert [s.start(k) for k in range(w)] == list(epochs[0])  # a pure function of j
    other = DomainStream("prose", num_tokens, T, seed=3)  # the name keys the stream
    if w > 3:
        assert [other.start(k) for k in range(w)] != list(epochs[0])


def test_large_epochs_are_a_permutation_too():
    """Past SMALL_EPOCH windows the order comes from grain's index_shuffle: still a bijection."""
    from moejax.data.mixture import SMALL_EPOCH, shuffled_window
    w = SMALL_EPOCH + 3
    order = [shuffled_window(k, w, perm_seed=9) for k in range(w)]
    assert sorted(order) == list(range(w)) and order[:100] != list(range(100))
    assert order != [shuffled_window(k, w, perm_seed=10) for k in range(w)]


def test_a_domain_too_short_for_one_row_fails_naming_it():
    with pytest.raises(ValueError, match=r"domain 'tiny' has 32 training tokens.*seq_len\+1=33"):
        _mixture({"code": 5000, "tiny": T}, {"code": 1.0, "tiny": 1.0})
    m = _mixture({"code": 5000, "tiny": T}, {"code": 1.0, "tiny": 0.0})  # unused: fine
    assert set(m.take(100)[0]) == {0}


# -- the chooser ----------------------------------------------------------------------------------

def test_row_uniforms_are_splitmix64_of_the_row():
    from moejax.data.mixture import _hash64
    key = _hash64("mixture-rows", 7)
    want = [(z >> 11) * 2.0 ** -53 for z in _splitmix64_by_hand(key, 50)]
    np.testing.assert_array_equal(row_uniforms(7, 0, 50), want)
    np.testing.assert_array_equal(row_uniforms(7, 20, 30), want[20:])  # a function of the row
    assert not np.array_equal(row_uniforms(8, 0, 50), want)


def test_realised_shares_match_the_weights_within_sampling_error():
    """10k rows: every domain's count within 4 binomial standard deviations of N*p; a
    zero-weight domain never drawn; each row's domain is the by-hand inverse CDF of its draw."""
    w = {"a": 5.0, "b": 3.0, "c": 1.5, "d": 0.5, "z": 0.0}
    m = _mixture({k: 100_000 for k in w}, w, seed=1)
    n = 10_000
    domains, positions = m.take(n)
    p = np.array(list(w.values())) / sum(w.values())
    counts = np.bincount(domains, minlength=len(w))
    bound = 4 * np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= bound).all(), (counts, n * p, bound)
    assert counts[-1] == 0
    u = row_uniforms(1, 0, n)
    assert [_choose_by_hand(list(w.values()), x) for x in u[:2000]] == domains[:2000].tolist()
    for d in range(len(w)):  # positions count each domain's rows: 0, 1, 2, ...
        np.testing.assert_array_equal(positions[domains == d], np.arange(counts[d]))


def test_bad_weights_fail_naming_the_domain():
    m = _mixture({"code": 5000, "prose": 5000, "math": 5000},
                 {"code": 1.0, "prose": 1.0, "math": 1.0})
    it = MixtureIterator(m, _fake_row, global_batch=4)
    ref = MixtureIterator(_mixture({"code": 5000, "prose": 5000, "math": 5000},
                                   {"code": 1.0, "prose": 1.0, "math": 1.0}), _fake_row, 4)
    _equal_batches([next(it)], [next(ref)])
    bad = [({"code": 1.0, "prose": -0.5, "math": 1.0}, r"domain 'prose' is -0\.5"),
           ({"code": 1.0, "prose": 1.0, "math": float("nan")}, r"domain 'math' is nan"),
           ({"code": 0.0, "prose": 0.0, "math": 0.0}, r"all zero.*'code', 'prose', 'math'"),
           ({"code": 1.0, "prose": 1.0, "math": 1.0, "web": 2.0}, r"unknown domain\(s\) \['web'\]"),
           ({"code": 1.0, "prose": 1.0}, r"no weight for domain\(s\) \['math'\]"),
           ({"code": 1.0, "prose": "lots", "math": 1.0}, r"domain 'prose' is 'lots'")]
    for weights, msg in bad:
        with pytest.raises(ValueError, match=msg):
            it.set_weights(weights)
        with pytest.raises(ValueError, match=msg):
            m.set_weights(weights)
    _equal_batches([next(it) for _ in range(3)], [next(ref) for _ in range(3)])  # untouched


# -- weights that change mid-run ------------------------------------------------------------------

SIZES = {"code": 5 * T + 3, "prose": 40 * T, "math": 9 * T + 1}  # epochs of 4, 38, 8 rows
W0 = {"code": 1.0, "prose": 1.0, "math": 1.0}
CHANGES = {3: {"code": 0.0, "prose": 1.0, "math": 3.0},  # before batch 3
           6: {"code": 5.0, "prose": 1.0, "math": 0.0},
           7: {"code": 1.0, "prose": 2.0, "math": 1.0}}


def _run(it, batches: int, first: int = 0, changes=CHANGES) -> list[dict]:
    """Batches ``first .. first + batches - 1`` of ``it``, changing weights before those in
    ``changes`` (as a mixer deciding after the previous step would)."""
    out = []
    for k in range(first, first + batches):
        if k in changes:
            it.set_weights(changes[k])
        out.append(next(it))
    return out


def _fake_iterator(threads=0, process_index=0, process_count=1, global_batch=B, sizes=SIZES):
    return MixtureIterator(_mixture(sizes, W0), _fake_row, global_batch, process_index,
                           process_count, threads=threads)


@pytest.mark.parametrize("threads", [0, 3])
def test_weight_changes_apply_from_the_next_batch_and_keep_every_stream_exact(threads):
    it = _fake_iterator(threads)
    batches = _run(it, 12)
    weights = dict(enumerate([W0] * 3 + [CHANGES[3]] * 3 + [CHANGES[6]] + [CHANGES[7]] * 5))
    u = row_uniforms(0, 0, 12 * B)
    for k, b in enumerate(batches):  # batch k follows the weights in force before it, by hand
        want = [_choose_by_hand(list(weights[k].values()), x) for x in u[k * B:(k + 1) * B]]
        assert b["domain"].tolist() == want, k
    _assert_streams_exact(_rows(batches), it.mixture, lambda r: int(r["start"]))
    assert all((b["domain"] != 0).all() for b in batches[3:6])  # code at weight 0
    assert (batches[6]["domain"] != 2).all()
    assert it.weights == CHANGES[7]
    it.close()


def test_prefetch_threads_do_not_change_the_rows(data):
    """Real rows: 2 reader threads planning ahead, weights changed while batches are in flight,
    give the batches of the synchronous iterator."""
    sync = _run(data.train_iterator(B), 9)
    threaded = prepare_data(dataclasses.replace(data.cfg, prefetch_threads=2))
    it = threaded.train_iterator(B)
    _equal_batches(_run(it, 9), sync)
    it.close()


@pytest.mark.parametrize("stop", [2, 5, 6])
def test_state_roundtrip_equals_the_uninterrupted_sequence(stop):
    """Interrupted after ``stop`` batches (mid-epoch of every domain; after a weight change for
    5 and 6), the state through JSON into a fresh iterator continues the straight sequence, and
    the later weight changes act on it the same way."""
    straight = _run(_fake_iterator(threads=2), 12)
    first = _fake_iterator(threads=2)
    head = _run(first, stop)
    state = json.loads(json.dumps(first.get_state()))
    assert state["mixture"]["rows"] == stop * B
    second = _fake_iterator()
    second.set_state(state)
    _equal_batches(head + _run(second, 12 - stop, first=stop), straight)


def test_restore_by_name_adds_and_drops_domains(caplog):
    """A state of {code, prose, math} restored into {code, math, web}: code and math continue
    at their saved positions, web starts at 0, prose is dropped; the configured weights apply
    (the domain set changed), each logged."""
    it = _fake_iterator()
    _run(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    saved = state["mixture"]["positions"]
    assert saved["code"] > 0 and saved["math"] > 0
    new_w = {"code": 1.0, "math": 2.0, "web": 1.0}
    other = MixtureIterator(_mixture({"code": SIZES["code"], "math": SIZES["math"], "web": 20 * T},
                                     new_w), _fake_row, B)
    with caplog.at_level(logging.WARNING, logger="moejax.data.mixture"):
        other.set_state(state)
    text = caplog.text
    assert "['web'] start at position 0" in text and "['prose'] dropped" in text
    assert "its weights apply" in text
    assert other.weights == new_w
    assert other.mixture.positions.tolist() == [saved["code"], saved["math"], 0]
    rows = _rows(_run(other, 6, changes={}))
    seen = {"code": saved["code"], "math": saved["math"], "web": 0}
    for d, row in rows:  # every domain continues where the state left it
        name = other.mixture.names[d]
        assert int(row["start"]) == other.mixture.streams[name].start(seen[name])
        seen[name] += 1
    assert all(seen[k] > v for k, v in {"code": saved["code"], "math": saved["math"],
                                        "web": 0}.items())


def test_a_state_of_another_stream_is_refused():
    with pytest.raises(ValueError, match=r"not written by the domain mixture"):
        _fake_iterator().set_state({"next_index": 3})


def test_restore_keeps_dynamic_weights_unless_the_configured_mixture_changed(caplog):
    it = _fake_iterator()
    _run(it, 4)  # weights changed before batch 3
    state = it.get_state()
    same = _fake_iterator()
    same.set_state(state)
    assert same.weights == CHANGES[3]  # the dynamic weights resume
    reweighted = MixtureIterator(_mixture(SIZES, {"code": 2.0, "prose": 1.0, "math": 1.0}),
                                 _fake_row, B)
    with caplog.at_level(logging.WARNING, logger="moejax.data.mixture"):
        reweighted.set_state(state)
    assert reweighted.weights == {"code": 2.0, "prose": 1.0, "math": 1.0}
    assert "configured mixture" in caplog.text


# -- real data: processes, grain checkpoints -------------------------------------------------------

@pytest.fixture(scope="module")
def data(data_cache):
    cfg = DataConfig(cache_dir=data_cache, corpus_bytes_per_domain=40_000, seq_len=T)
    return prepare_data(cfg, vocab_size=512)


def test_real_rows_are_the_domain_streams_windows(data):
    """Each domain's rows, in order and across weight changes, hold the tokens of windows
    0, 1, 2, ... of that domain's stream."""
    mixture = data.train_mixture()
    seen = {k: 0 for k in data.domains}
    for d, row in _rows(_run(data.train_iterator(B), 10)):
        name = data.domains[d]
        start = mixture.streams[name].start(seen[name])
        seen[name] += 1
        store = data.stores[(name, "train")]
        np.testing.assert_array_equal(row["inputs"], store.read(start, T))
        np.testing.assert_array_equal(row["targets"], store.read(start + 1, T))
    assert min(seen.values()) > 0, seen


def test_two_processes_read_the_halves_of_the_global_batch(data):
    whole = _run(data.train_iterator(B), 8)
    halves = [_run(data.train_iterator(B, process_index=p, process_count=2), 8) for p in (0, 1)]
    for k in range(8):
        assert len(halves[0][k]["domain"]) == B // 2
        cat = {key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in whole[k]}
        _equal_batches([cat], [whole[k]])


def test_grain_checkpoint_holds_the_mixture_and_the_mixer(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = data.train_iterator(B)
    it.mixer = CyclingMixer(data.domains)
    _run(it, 4)
    it.mixer.calls = 11
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = _run(it, 4, first=4)
        restored = data.train_iterator(B)
        restored.mixer = CyclingMixer(data.domains)
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert restored.mixer.calls == 11 and restored.weights == CHANGES[3]
    _equal_batches(_run(restored, 4, first=4), expected)


def test_a_checkpoint_of_another_stream_is_refused_not_set_aside(data, tmp_path):
    """A step whose data item an older training stream wrote (a plain grain iterator) is intact
    but incompatible: restoring it raises CheckpointMismatchError and the step stays in place
    (before, it was moved aside as damaged and the run silently started from step 0)."""
    import grain

    from moejax import train as T
    from moejax.ckpt import CheckpointMismatchError, Checkpointer

    state = T.TrainState(step=np.int32(3), params={"w": np.ones(2, np.float32)}, rest=None,
                         opt_state={}, rng=np.zeros(2, np.uint32))
    old_stream = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(old_stream)
    ck = Checkpointer(tmp_path / "ckpt", async_save=False)
    ck.save(3, state, old_stream, {"step": 3, "tokens": 0})
    ck.wait()
    with pytest.raises(CheckpointMismatchError, match="not written by the domain mixture"):
        ck.restore_latest(state, data.train_iterator(B))
    assert ck.latest_step() == 3 and not (tmp_path / "ckpt" / "damaged-3").exists()


# -- the trainer: mixer hook, per-domain tokens, interrupt + resume ------------------------------

STEPS = 6


class CyclingMixer:
    """A trivial mixer: on even steps, weights from a call counter kept in its state (a resumed
    run that lost that state would choose other weights)."""

    WEIGHTS = (4.0, 1.0, 0.0)

    def __init__(self, domains):
        self.domains, self.calls = tuple(domains), 0

    def before_step(self, trainer, step):
        if trainer is not None:
            assert int(trainer.state.step) == step  # the state after ``step`` steps
        self.calls += 1
        if step % 2:
            return None
        return {d: self.WEIGHTS[(self.calls + i) % 3] for i, d in enumerate(self.domains)}

    def state(self):
        return {"calls": self.calls}

    def load_state(self, state):
        self.calls = int(state["calls"])


def _cfg(data_cache):
    return tiny_config(data={"cache_dir": data_cache},
                       train={"steps": STEPS, "ckpt_every": 100, "eval_every": 100})


def _records(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


@pytest.fixture(scope="module")
def straight_mixed(data_cache, tmp_path_factory):
    cfg = _cfg(data_cache)
    wd = str(tmp_path_factory.mktemp("mixed") / "run")
    trainer = Trainer(cfg, wd, mixer=CyclingMixer(cfg.data.domains), progress=False)
    return wd, trainer.run(), trainer


def test_trainer_counts_target_tokens_per_domain_by_hand(straight_mixed, data_cache):
    """``train/tokens/<domain>`` at every step equals the loss-mask sum of that domain's rows in
    the batches the mixer's weights draw (replayed by hand), and the logged weights are the
    mixer's."""
    wd, summary, trainer = straight_mixed
    cfg = _cfg(data_cache)
    data = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size)
    it, mixer = data.train_iterator(cfg.train.batch_size), CyclingMixer(data.domains)
    counts, weights = np.zeros(len(data.domains)), dict(zip(data.domains, cfg.data.mixture))
    zero_weight_steps = 0
    recs = _records(wd)
    for step in range(STEPS):
        w = mixer.before_step(None, step)
        if w is not None:
            it.set_weights(w)
            weights = w
        batch, before = next(it), counts.copy()
        for j, d in enumerate(batch["domain"]):
            counts[d] += batch["loss_mask"][j].sum()
        got = recs[step + 1]
        assert [got[f"train/tokens/{d}"] for d in data.domains] == counts.astype(int).tolist()
        assert {d: got[f"train/mixture/{d}"] for d in data.domains} == weights
        for i, d in enumerate(data.domains):  # the mixer's zero weights left domains out
            if weights[d] == 0:
                assert counts[i] == before[i]
                zero_weight_steps += 1
    assert zero_weight_steps >= STEPS


def test_interrupt_and_resume_with_a_mixer_is_bit_identical(straight_mixed, data_cache, tmp_path):
    """Ctrl-C after step 3, resume with a fresh mixer: its state comes back from the data item
    of the checkpoint, and losses, token counts and weights equal the straight run's."""
    wd_ref, ref_summary, _ = straight_mixed
    cfg = _cfg(data_cache)
    wd = str(tmp_path / "run")

    def ctrl_c_at_3(trainer, step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = Trainer(cfg, wd, mixer=CyclingMixer(cfg.data.domains), on_step=ctrl_c_at_3,
                    progress=False).run()
    assert first["preempted"] and first["step"] == 3
    with open(os.path.join(wd, "ckpt", "3", "data", "process_0-of-1.json")) as f:
        assert json.load(f)["mixer"] == {"calls": 3}
    mixer = CyclingMixer(cfg.data.domains)
    resumed = Trainer(cfg, wd, mixer=mixer, progress=False).run()
    assert resumed["step"] == STEPS and mixer.calls == STEPS
    ref, got = _records(wd_ref), _records(wd)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    def exact(rec):
        return {k: v for k, v in rec.items()
                if k.startswith(("train/loss", "train/tokens/", "train/mixture/"))}

    assert len(exact(ref[1])) >= 7
    for s in ref:
        assert exact(got[s]) == exact(ref[s]), s
    assert resumed["val/loss"] == ref_summary["val/loss"]


def test_a_resume_may_change_the_mixture_and_drop_a_domain(data_cache, tmp_path):
    """The keyed mixture restores by domain name, so a resumed run may (when its caller allows it)
    reweight and drop domains:
    the new weights are logged from the first resumed step and the kept domains' token counts
    continue from the checkpoint's (a conflict on any other data field is still refused)."""
    cfg = _cfg(data_cache)
    wd = str(tmp_path / "run")
    Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3)), wd,
            progress=False).run()
    kept = cfg.data.domains[:2]
    cfg2 = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, domains=kept,
                                                             mixture=(1.0, 3.0)))
    with pytest.raises(ConfigError, match="data.domains"):  # not by default
        Trainer(cfg2, wd, progress=False).run()
    out = Trainer(cfg2, wd, progress=False, allow_mixture_change=True).run()
    assert out["step"] == STEPS
    recs = _records(wd)
    assert {d: recs[4][f"train/mixture/{d}"] for d in kept} == {kept[0]: 1.0, kept[1]: 3.0}
    assert f"train/tokens/{cfg.data.domains[2]}" not in recs[4]
    for d in kept:
        assert recs[4][f"train/tokens/{d}"] >= recs[3][f"train/tokens/{d}"]
    assert sum(recs[STEPS][f"train/tokens/{d}"] for d in kept) > sum(
        recs[3][f"train/tokens/{d}"] for d in kept)
    with pytest.raises(ConfigError, match="data.seq_len"):
        Trainer(dataclasses.replace(cfg2, data=dataclasses.replace(
            cfg2.data, seq_len=cfg.data.seq_len // 2)), wd, progress=False,
            allow_mixture_change=True).run()
