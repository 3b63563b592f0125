"""moejax.data: embedded corpus, tokenizers, tensorstore token streams and the grain pipeline."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.config import DataConfig
from moejax.data import (BPETokenizer, ByteTokenizer, Tokenizer, corpus_provenance, load_documents,
                         prepare_data, split_documents)
from moejax.data import corpus as corpus_lib
from moejax.data import corpus_build as build_lib

CAP, T, B = 300_000, 64, 8


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), corpus_bytes_per_domain=CAP,
                      seq_len=T, val_fraction=0.05)


@pytest.fixture(scope="module")
def data(cfg):
    return prepare_data(cfg, vocab_size=512)


def _splits(cfg, domain):
    docs = load_documents(cfg.corpus, domain, cfg.corpus_bytes_per_domain, cfg.cache_dir)
    return split_documents(docs, domain, cfg.val_fraction, cfg.seed)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- corpus -------------------------------------------------------------------------------------

def test_corpus_deterministic_nonempty_distinct(tmp_path, cfg, data):
    cap = 60_000
    dirs = [tmp_path / "a", tmp_path / "b"]
    docs = {d: [corpus_lib.embedded_domain(dom, cap, str(d)) for dom in build_lib.EMBEDDED_DOMAINS]
            for d in dirs}
    assert docs[dirs[0]] == docs[dirs[1]]
    for dom in build_lib.EMBEDDED_DOMAINS:  # byte-identical cache files
        (a,), (b,) = ((d / "corpus").glob(f"{dom}-*/docs.jsonl") for d in dirs)
        assert a.read_bytes() == b.read_bytes()
    code, prose, math = (_splits(cfg, dom)[0] for dom in build_lib.EMBEDDED_DOMAINS)
    for docs_ in (code, prose, math):
        assert len(docs_) >= 3
        assert sum(len(d.encode()) for d in docs_) <= CAP
    assert not set(code) & set(prose) and not set(code) & set(math) and not set(prose) & set(math)
    assert any("def " in d for d in code) and all(len(d) >= 200 for d in prose)
    assert all(d.startswith("Q: ") and "\nA: " in d for d in math)
    assert all(data.num_tokens(dom, s) > T for dom in data.domains for s in ("train", "val"))


def _check_math(doc: str) -> None:
    if m := re.fullmatch(r"Q: What is (\d+) divided by (\d+)\?\nA: (\d+) remainder (\d+)", doc):
        a, b, q, r = map(int, m.groups())
        assert (q, r) == divmod(a, b), doc
    elif m := re.fullmatch(r"Q: What is ([\d+\-* ()]+)\?\nA: (-?\d+)", doc):
        assert eval(m.group(1)) == int(m.group(2)), doc
    elif m := re.fullmatch(r"Q: [^\n]+\?\nA: ([\d+\-*/ ]+) = (-?\d+)", doc, flags=re.S):
        assert eval(m.group(1)) == int(m.group(2)), doc
    else:
        raise AssertionError(f"unparsed math document: {doc!r}")


def test_math_answers_correct(cfg):
    train, val = _splits(cfg, "math")
    docs = train + val
    kinds = {("divided" in d, "=" in d) for d in docs}
    assert kinds == {(True, False), (False, False), (False, True)}  # all three problem kinds present
    for doc in docs[:3000]:
        _check_math(doc)
    with pytest.raises(AssertionError):
        _check_math("Q: What is 2 + 2?\nA: 5")


# -- tokenizers ---------------------------------------------------------------------------------

def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    for text in ["", "hello", "héllo wörld ∑ 😀 中文\n\t", "\x00\xff"]:
        ids = tok.encode(text)
        assert ids == [b + 3 for b in text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert tok.decode([1] + tok.encode("ab") + [2, 0]) == "ab"  # specials are dropped


def test_bpe_trains_roundtrips_and_loads_back(cfg, tmp_path):
    bcfg = dataclasses.replace(cfg, tokenizer="bpe", bpe_vocab_size=300)
    d = prepare_data(bcfg, vocab_size=300)
    tok = d.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    path = d.path / "tokenizer.json"
    specials = [t["content"] for t in json.loads(path.read_text())["added_tokens"]]
    assert specials == ["<pad>", "<bos>", "<eos>"]
    # 2000 characters of training code, whatever the interpreter's standard library holds
    code = "\n".join(_splits(cfg, "code")[0])[:2000]
    assert len(code) == 2000
    samples = [code, "Q: What is 3 * 4?\nA: 12", "héllo ∑ 😀 中文"]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < 300 and min(ids) >= 3
    assert len(tok.encode(samples[0])) < 0.8 * len(samples[0].encode())  # merges compress
    # a tokenizer.json path as data.tokenizer: same ids, specials read from the file
    fcfg = dataclasses.replace(cfg, tokenizer=str(path))
    loaded = prepare_data(fcfg, vocab_size=300).tokenizer
    assert [loaded.encode(s) for s in samples] == [tok.encode(s) for s in samples]
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, 300)
    with pytest.raises(ValueError, match="model.vocab_size=299"):
        prepare_data(bcfg, vocab_size=299)
    # a tokenizer.json without bos/eos/pad fails clearly
    from tokenizers import Tokenizer as HF, models
    bare = tmp_path / "bare.json"
    HF(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(bare))
    with pytest.raises(ValueError, match=r"lacks special token\(s\) \['pad', 'bos', 'eos'\]"):
        BPETokenizer.from_file(bare)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prepare_data(dataclasses.replace(cfg, tokenizer=str(tmp_path / "nope.json")))


# -- token streams ------------------------------------------------------------------------------

def test_token_streams_equal_tokenized_documents(cfg, data):
    tok = data.tokenizer
    for dom in data.domains:
        for split, docs in zip(("train", "val"), _splits(cfg, dom)):
            store = data.stores[(dom, split)]
            expected = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs])
            np.testing.assert_array_equal(store.read(0, store.num_tokens), expected)
            assert len(store) == len(docs) == data.num_docs(dom, split)
            k = len(docs) // 2
            assert tok.decode(store[k]) == docs[k]
            assert store.num_tokens == data.num_tokens(dom, split) == len(expected)


def test_prepare_again_is_cheap_and_rejects_small_vocab(cfg, data):
    t0 = time.perf_counter()
    again = prepare_data(cfg, vocab_size=259)
    assert time.perf_counter() - t0 < 1.0
    assert again.path == data.path
    with pytest.raises(ValueError, match="model.vocab_size=258"):
        prepare_data(cfg, vocab_size=258)


def test_concurrent_builds_agree(tmp_path):
    """Two processes building the same cache at once: both succeed and end on one copy."""
    script = ("import sys; from moejax.config import DataConfig; from moejax.data import prepare_data;"
              "d = prepare_data(DataConfig(cache_dir=sys.argv[1], corpus_bytes_per_domain=40_000,"
              " seq_len=16)); print(d.path, d.stores['math', 'train'].read(0, 99).sum())")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and len(list(tmp_path.glob("data-*"))) == 1
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "corpus").glob(".tmp-*"))


def test_publish_keeps_winner_and_failed_build_leaves_nothing(tmp_path, monkeypatch):
    final = tmp_path / "done"
    for content in ("winner", "loser"):
        tmp = corpus_lib.make_tmp(tmp_path, "x")
        (tmp / "f").write_text(content)
        assert corpus_lib.publish(tmp, final) == final and not tmp.exists()
    assert (final / "f").read_text() == "winner"

    from moejax.data import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(pipeline, "write_stream", boom)
    cfg = DataConfig(cache_dir=str(tmp_path / "c"), corpus_bytes_per_domain=20_000, seq_len=16)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    assert not list((tmp_path / "c").glob("data-*")) and not list((tmp_path / "c").glob(".tmp-*"))


def test_local_corpus_dir(tmp_path):
    root = tmp_path / "texts"
    for dom, n in (("a", 6), ("b", 4)):
        (root / dom).mkdir(parents=True)
        for i in range(n):
            (root / dom / f"{i:02d}.txt").write_text(f"{dom} document {i} " * 20)
    cfg = DataConfig(corpus=str(root), cache_dir=str(tmp_path / "c"), domains=("a", "b"),
                     mixture=(1.0, 1.0), seq_len=16, val_fraction=0.25)
    d = prepare_data(cfg)
    assert d.domains == ("a", "b")
    assert (d.num_docs("a", "train"), d.num_docs("a", "val")) == (4, 2)
    assert (d.num_docs("b", "train"), d.num_docs("b", "val")) == (3, 1)
    batch = next(d.train_iterator(4))
    assert batch["inputs"].shape == (4, 16) and set(batch["domain"]) <= {0, 1}
    with pytest.raises(FileNotFoundError) as e:
        prepare_data(dataclasses.replace(cfg, domains=("a", "zzz"), mixture=(1.0, 1.0)))
    assert str(root / "zzz") in str(e.value) and "*.txt" in str(e.value)


def _by_hand_sha256(docs: list[str]) -> str:
    return hashlib.sha256("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
                          .encode("utf-8")).hexdigest()


def test_embedded_corpus_provenance(cfg, data):
    """Python version and content hash in the manifest and in ``corpus_provenance``."""
    prov = corpus_provenance(cfg)
    assert prov["corpus"] == "embedded" and prov["python_version"] == platform.python_version()
    assert list(prov["domains"]) == list(cfg.domains)
    for dom in cfg.domains:
        docs = load_documents(cfg.corpus, dom, cfg.corpus_bytes_per_domain, cfg.cache_dir)
        assert prov["domains"][dom] == {"docs": len(docs), "sha256": _by_hand_sha256(docs),
                                        "bytes": sum(len(d.encode()) for d in docs)}
        (meta,) = (Path(cfg.cache_dir) / "corpus").glob(f"{dom}-*/meta.json")
        manifest = json.loads(meta.read_text())
        assert manifest["sha256"] == prov["domains"][dom]["sha256"]
        assert manifest["python_version"] == platform.python_version()
    assert len({m["sha256"] for m in prov["domains"].values()}) == len(cfg.domains)
    assert json.loads(json.dumps(prov)) == prov == corpus_provenance(cfg)  # JSON-ready, stable


def test_local_corpus_provenance_follows_content_not_path(tmp_path):
    texts = {"a": ["alpha " * 40, "beta " * 40], "b": ["gamma " * 40, "delta " * 40]}
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        for dom, docs in texts.items():
            (root / dom).mkdir(parents=True)
            for i, doc in enumerate(docs):
                (root / dom / f"{i}.txt").write_text(doc)
    cfgs = [DataConfig(corpus=str(r), cache_dir=str(tmp_path / "c"), domains=("a", "b"),
                       mixture=(1.0, 1.0)) for r in roots]
    first, second = (corpus_provenance(c) for c in cfgs)
    assert first["domains"]["a"]["sha256"] == _by_hand_sha256(texts["a"])
    assert first["sha256"] == second["sha256"] and first["corpus"] != second["corpus"]
    (roots[1] / "b" / "1.txt").write_text("epsilon " * 40)  # another size: a new fingerprint
    changed = corpus_provenance(cfgs[1])
    assert changed["domains"]["a"] == first["domains"]["a"]
    assert changed["domains"]["b"]["sha256"] == _by_hand_sha256([texts["b"][0], "epsilon " * 40])
    assert changed["sha256"] != first["sha256"]


def test_missing_corpus_dir_names_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError) as e:
        prepare_data(DataConfig(corpus=str(missing), cache_dir=str(tmp_path / "c")))
    assert str(missing / "code") in str(e.value) and "*.txt" in str(e.value)


# -- batches ------------------------------------------------------------------------------------

def test_batch_shapes_dtypes_and_shift(data):
    it = data.train_iterator(global_batch=B)
    for batch in _take(it, 3):
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "domain"}
        for k in ("inputs", "targets", "segment_ids", "positions"):
            assert batch[k].shape == (B, T) and batch[k].dtype == np.int32, k
        assert batch["loss_mask"].shape == (B, T) and batch["loss_mask"].dtype == np.float32
        assert batch["domain"].shape == (B,) and batch["domain"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 259


def _by_hand(offsets, start, n):
    """Segment ids, positions and loss mask of a row of n+1 tokens, walking the doc offsets."""
    offs = [int(o) for o in offsets]
    doc = bisect.bisect_right(offs, start) - 1
    seg, pos, docs, segs, poss = 1, 0, [], [], []
    for j in range(n + 1):
        if j > 0 and start + j == offs[doc + 1]:
            doc, seg, pos = doc + 1, seg + 1, 0
        docs.append(doc), segs.append(seg), poss.append(pos)
        pos += 1
    mask = [float(docs[j + 1] == docs[j]) for j in range(n)]
    return segs[:n], poss[:n], mask


def test_row_fields_match_by_hand(data):
    b = 16
    it = data.train_iterator(global_batch=b)
    crossings = 0
    for k in range(4):
        batch = next(it)
        for j in range(b):
            d, start = data._row_choice(k * b + j)
            assert batch["domain"][j] == d
            store = data.stores[(data.domains[d], "train")]
            np.testing.assert_array_equal(batch["inputs"][j], store.read(start, T))
            np.testing.assert_array_equal(batch["targets"][j], store.read(start + 1, T))
            segs, poss, mask = _by_hand(store.offsets, start, T)
            np.testing.assert_array_equal(batch["segment_ids"][j], segs)
            np.testing.assert_array_equal(batch["positions"][j], poss)
            np.testing.assert_array_equal(batch["loss_mask"][j], mask)
            starts = np.flatnonzero(batch["positions"][j] == 0)[1:]
            assert (batch["inputs"][j][starts] == data.tokenizer.bos_id).all()
            crossings += batch["segment_ids"][j].max() > 1
    assert crossings > 0  # math documents are short: packed rows do cross documents


def test_mixture_weights(cfg, data):
    only_code = prepare_data(dataclasses.replace(cfg, mixture=(1.0, 0.0, 0.0)))
    doms = np.concatenate([b["domain"] for b in _take(only_code.train_iterator(64), 4)])
    assert (doms == 0).all()
    weighted = prepare_data(dataclasses.replace(cfg, mixture=(3.0, 1.0, 1.0)))
    doms = np.concatenate([b["domain"] for b in _take(weighted.train_iterator(100), 40)])
    freq = np.bincount(doms, minlength=3) / len(doms)
    np.testing.assert_allclose(freq, [0.6, 0.2, 0.2], atol=0.03)  # 4000 rows: sd ~0.008


@pytest.mark.parametrize("procs", [2, 4])
def test_per_process_slices_concatenate_to_global(data, procs):
    glob = _take(data.train_iterator(global_batch=B), 3)
    locs = [_take(data.train_iterator(B, process_index=p, process_count=procs), 3)
            for p in range(procs)]
    for k in range(3):
        assert locs[0][k]["inputs"].shape == (B // procs, T)
        cat = {key: np.concatenate([locs[p][k][key] for p in range(procs)]) for key in glob[k]}
        _assert_batches_equal([cat], [glob[k]])
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.train_iterator(6, process_index=0, process_count=4)


def test_iterator_state_roundtrip(data):
    it = data.train_iterator(B, process_index=1, process_count=2)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.train_iterator(B, process_index=1, process_count=2)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_iterator_orbax_roundtrip(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = data.train_iterator(B)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = _take(it, 3)
        restored = data.train_iterator(B)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(_take(restored, 3), expected)


def test_prefetch_threads_same_batches(cfg, data):
    threaded = prepare_data(dataclasses.replace(cfg, prefetch_threads=2))
    _assert_batches_equal(_take(threaded.train_iterator(B), 6), _take(data.train_iterator(B), 6))


def test_validation_batches_held_out_and_deterministic(cfg, data):
    for dom in data.domains:
        train_docs, val_docs = _splits(cfg, dom)
        assert not set(train_docs) & set(val_docs)
        vals = data.eval_batches(dom, num_batches=2, global_batch=4)
        _assert_batches_equal(vals, data.eval_batches(dom, num_batches=2, global_batch=4))
        store = data.stores[(dom, "val")]
        val_text = data.tokenizer.decode(store.read(0, store.num_tokens))
        assert val_text == "".join(val_docs)  # the rows are read from held-out documents only
        for k, batch in enumerate(vals):
            assert (batch["domain"] == data.domains.index(dom)).all()
            for j in range(4):
                w = k * 4 + j
                got = store.read(w * T, T + 1)
                n = len(got) - 1
                np.testing.assert_array_equal(batch["inputs"][j][:n], got[:-1])
                np.testing.assert_array_equal(batch["targets"][j][:n], got[1:])
                segs, poss, mask = _by_hand(store.offsets, w * T, n)
                np.testing.assert_array_equal(batch["loss_mask"][j][:n], mask)
                assert (batch["loss_mask"][j][n:] == 0).all()
        halves = [data.eval_batches(dom, 2, 4, process_index=p, process_count=2) for p in (0, 1)]
        for k in range(2):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][k]["inputs"], halves[1][k]["inputs"]]), vals[k]["inputs"])


def test_validation_past_end_is_padding(data):
    store = data.stores[("code", "val")]
    rows = data.num_eval_rows("code")  # windows holding a target; any later row would be padding
    vals = data.eval_batches("code", num_batches=rows // 4 + 2, global_batch=4)
    assert len(vals) == -(-rows // 4)  # capped at the split: no all-padding batch
    assert all(b["loss_mask"].sum() > 0 for b in vals)
    last = vals[-1]
    j = (rows - 1) % 4  # the last real row; rows after it in its batch are padding
    n = store.num_tokens - (rows - 1) * T  # real tokens in its window of T + 1
    assert (last["inputs"][j][n:] == data.tokenizer.pad_id).all()
    assert (last["loss_mask"][j][n - 1:] == 0).all() and (last["segment_ids"][j][n:] == 0).all()
    assert (last["loss_mask"][j + 1:] == 0).all() and (last["segment_ids"][j + 1:] == 0).all()
    total = sum(b["loss_mask"].sum() for b in vals)
    # every target token of the stream is predicted once, minus the document boundaries
    assert total == store.num_tokens - 1 - (len(store) - 1)
