"""``python -m moejax.data.prepare``: a generated 3-domain corpus (JSONL, JSONL.gz, Parquet,
ArrayRecord; folder and field domains) is read back exactly (every stream equals the source text
re-tokenized by hand), a worker pool equals in-process tokenization, an interrupted prepare resumes
to the straight result, the training pipeline and a Trainer run on the prepared directory, and bad
input fails naming the file, record, field or flag."""

import gzip
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorstore as ts

from moejax.config import DataConfig
from moejax.data import prepare as P
from moejax.data import sources as sources_lib
from moejax.data import corpus_provenance, prepare_data, store as store_lib
from moejax.data.store import TokenStore
from moejax.data.tokenizer import BPETokenizer, ByteTokenizer
from moejax.testing import tiny_config
from test_run_gcs import gcs  # noqa: F401  (the fixture: a local stand-in for a GCS bucket)

DOMAINS = ("code", "math", "prose")
VAL = 0.1


def _docs(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}{seed}")
    words = ["alpha", "beta", "gamma", "delta", "héllo", "naïve", "x", "def", "return", "42"]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 120))) for _ in range(n)]
    docs[3] = ""  # an empty document is skipped
    docs[5] = docs[4]  # a duplicate lands in the same split as its twin
    return docs


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


def _write_array_record(path, rows):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in rows:
        w.write(json.dumps(r).encode())
    w.close()


def make_source(root) -> dict[str, list[str]]:
    """code: a folder of JSONL (+ .gz); prose: a folder of Parquet; math: top-level JSONL and
    ArrayRecord files with a domain field. Returns every domain's documents in prepare order."""
    (root / "code").mkdir(parents=True)
    (root / "prose").mkdir()
    code = [_docs("code", 400, k) for k in range(2)]
    _write_jsonl(root / "code" / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(code[0])])
    _write_jsonl(root / "code" / "b.jsonl.gz", [{"text": t} for t in code[1]], gz=True)
    prose = [_docs("prose", 500, k) for k in range(2)]
    for k, docs in enumerate(prose):
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}),
                       root / "prose" / f"p{k}.parquet", row_group_size=128)
    math = [_docs("math", 300, k) for k in range(2)]
    _write_array_record(root / "m0.array_record", [{"text": t, "domain": "math"} for t in math[0]])
    _write_jsonl(root / "m1.jsonl", [{"text": t, "domain": "math"} for t in math[1]])
    (root / "README.md").write_text("ignored")
    return {"code": code[0] + code[1], "math": math[0] + math[1], "prose": prose[0] + prose[1]}


def expected_stream(docs: list[str], split: str, tok) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a stream, by hand: each kept document as [bos] + ids + [eos]."""
    toks, offsets = [], [0]
    for d in docs:
        if d.strip() and P.split_of(d, VAL) == split:
            ids = [tok.bos_id, *tok.encode(d), tok.eos_id]
            toks += ids
            offsets.append(offsets[-1] + len(ids))
    return np.array(toks, np.int32), np.array(offsets, np.int64)


def read_stream(out, key: str) -> tuple[np.ndarray, np.ndarray]:
    s = TokenStore(f"{out}/{key}")
    return s.read(0, s.num_tokens), s.offsets


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return root, make_source(root)


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    """The source prepared straight through by a pool of 2 worker processes."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    manifest = P.prepare(str(source[0]), str(out), val_fraction=VAL, workers=2, progress=False)
    return out, manifest


def test_streams_equal_the_source_retokenized(source, prepared):
    docs, (out, m) = source[1], prepared
    assert m["complete"] and m["domains"] == list(DOMAINS)
    assert sorted(m["files"]) == ["code/a.jsonl", "code/b.jsonl.gz", "m0.array_record",
                                  "m1.jsonl", "prose/p0.parquet", "prose/p1.parquet"]
    tok = ByteTokenizer()
    for dom in DOMAINS:
        for split in P.SPLITS:
            toks, offsets = expected_stream(docs[dom], split, tok)
            got_toks, got_offsets = read_stream(out, f"{dom}/{split}")
            np.testing.assert_array_equal(got_toks, toks)
            np.testing.assert_array_equal(got_offsets, offsets)
            assert m["streams"][f"{dom}/{split}"] == {"docs": len(offsets) - 1, "tokens": len(toks)}
        assert sum(f["records"] for rel, f in m["files"].items()
                   if any(k.startswith(dom) for k in f["streams"])) == len(docs[dom])


def test_val_split_is_a_stable_hash_share():
    texts = [f"document number {i}" for i in range(20_000)]
    val = sum(P.split_of(t, VAL) == "val" for t in texts)
    sd = (len(texts) * VAL * (1 - VAL)) ** 0.5
    assert abs(val - len(texts) * VAL) < 4 * sd
    assert [P.split_of(t, VAL) for t in texts[:50]] == [P.split_of(t, VAL) for t in texts[:50]]


def _arrays(out) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    m = P.read_manifest(out)
    return {k: read_stream(out, k) for k in m["streams"]}


def _without_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "prepare_seconds"}


def test_interrupted_prepare_resumes_to_the_straight_result(source, prepared, tmp_path,
                                                            monkeypatch):
    """Killed in the middle of the second file (after a part of it reached the disk), rerun in
    this process (workers=0): identical streams and manifest to the straight pool run."""
    out = tmp_path / "out"
    monkeypatch.setattr(store_lib, "CHUNK", 256)  # small chunks: the killed file writes some
    calls, real_append = [], P._append

    def dying_append(streams, result, rec):
        calls.append(1)
        if len(calls) == 4:  # file 1 (code/a.jsonl) is 2 tasks; file 2 dies in its second task
            assert P.read_manifest(out)["files"].keys() == {"code/a.jsonl"}
            raise KeyboardInterrupt
        return real_append(streams, result, rec)

    monkeypatch.setattr(P, "_append", dying_append)
    monkeypatch.setattr(sources_lib, "CHUNK_DOCS", 256)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(str(source[0]), str(out), val_fraction=VAL, workers=0, progress=False)
    m = P.read_manifest(out)
    assert not m["complete"] and list(m["files"]) == ["code/a.jsonl"]
    committed = m["streams"]["code/train"]["tokens"]
    on_disk = ts.open(store_lib._spec(out / "code/train/tokens"), open=True).result().shape[0]
    assert on_disk > committed, "the interrupted file should have left tokens past the commit"
    with pytest.raises(ValueError, match="preparation did not finish"):
        prepare_data(DataConfig(corpus=str(out), domains=DOMAINS))

    monkeypatch.setattr(P, "_append", real_append)
    resumed = P.prepare(str(source[0]), str(out), val_fraction=VAL, workers=0, progress=False)
    assert _without_timing(resumed) == _without_timing(prepared[1])
    straight = _arrays(prepared[0])
    for key, (toks, offsets) in _arrays(out).items():
        np.testing.assert_array_equal(toks, straight[key][0])
        np.testing.assert_array_equal(offsets, straight[key][1])
    again = P.prepare(str(source[0]), str(out), val_fraction=VAL, workers=0, progress=False)
    assert _without_timing(again) == _without_timing(resumed)  # a finished dir: nothing to do


def test_pipeline_opens_the_prepared_dir(prepared):
    out = prepared[0]
    cfg = DataConfig(corpus=str(out), domains=("prose", "code"), mixture=(1.0, 2.0), seq_len=32)
    data = prepare_data(cfg, vocab_size=300)
    assert data.num_docs("code", "val") == prepared[1]["streams"]["code/val"]["docs"]
    rows = [data.train_row(i) for i in range(200)]
    assert {int(r["domain"]) for r in rows} == {0, 1}
    for i, r in enumerate(rows[:20]):  # each row is a window of its domain's stream
        store = data.stores[(data.domains[int(r["domain"])], "train")]
        _, start = data._row_choice(i)
        np.testing.assert_array_equal(r["inputs"], store.read(start, 32))
    assert len(data.eval_batches("code", 2, 4)) >= 1
    with pytest.raises(ValueError, match=r"data.domains: \['web'\] not in the prepared corpus"):
        prepare_data(DataConfig(corpus=str(out), domains=("code", "web"), mixture=(1.0, 1.0)))
    with pytest.raises(ValueError, match="data.tokenizer='bpe'.*byte tokenizer; set data.tokenizer=byte"):
        prepare_data(DataConfig(corpus=str(out), domains=DOMAINS, tokenizer="bpe"))


def test_a_trainer_runs_on_the_prepared_dir(prepared, tmp_path):
    from moejax.trainer import Trainer

    cfg = tiny_config(data={"corpus": str(prepared[0]), "domains": DOMAINS},
                      train={"steps": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1})
    summary = Trainer(cfg, str(tmp_path / "run"), progress=False).run()
    assert summary["step"] == 2 and summary["nonfinite_steps"] == 0
    assert all(np.isfinite(summary[f"val/loss/{d}"]) for d in DOMAINS), summary
    prov = corpus_provenance(cfg.data)  # what summary.json records for a prepared corpus
    assert prov["domains"]["code"]["docs"] == sum(
        prepared[1]["streams"][f"code/{s}"]["docs"] for s in P.SPLITS)


def test_bpe_tokenizer_is_trained_and_used(source, tmp_path):
    out = tmp_path / "bpe"
    m = P.prepare(str(source[0]), str(out), "bpe", bpe_vocab_size=300, val_fraction=VAL, workers=0,
                  progress=False)
    tok = BPETokenizer.from_file(out / "tokenizer.json")
    assert m["tokenizer"]["kind"] == "bpe" and m["vocab_size"] == tok.vocab_size == 300
    toks, offsets = expected_stream(source[1]["math"], "train", tok)
    got = read_stream(out, "math/train")
    np.testing.assert_array_equal(got[0], toks)
    np.testing.assert_array_equal(got[1], offsets)
    data = prepare_data(DataConfig(corpus=str(out), domains=DOMAINS, tokenizer="bpe", seq_len=32),
                        vocab_size=300)
    assert data.tokenizer.vocab_size == 300
    again = P.prepare(str(source[0]), str(out), "bpe", bpe_vocab_size=300, val_fraction=VAL,
                      workers=0, progress=False)  # a rerun resumes with the trained tokenizer
    assert _without_timing(again) == _without_timing(m)
    by_file = P.prepare(str(source[0]), str(tmp_path / "file"), str(out / "tokenizer.json"),
                        val_fraction=VAL, workers=0, progress=False)  # the same tokenizer, as a file
    assert by_file["tokenizer"]["kind"] == "file" and by_file["streams"] == m["streams"]
    np.testing.assert_array_equal(read_stream(tmp_path / "file", "math/train")[0], toks)
    with pytest.raises(ValueError, match="set data.tokenizer=.*file/tokenizer.json"):
        prepare_data(DataConfig(corpus=str(tmp_path / "file"), domains=DOMAINS, tokenizer="bpe"))
    with pytest.raises(P.PrepareError, match="prepared with --tokenizer {'kind': 'bpe', "
                                             "'vocab_size': 300}, not {'kind': 'byte'}"):
        P.prepare(str(source[0]), str(out), "byte", val_fraction=VAL, workers=0, progress=False)


def test_cli_prints_the_streams_and_fails_with_exit_2(source, tmp_path, capsys):
    src = tmp_path / "one"
    (src / "d").mkdir(parents=True)
    _write_jsonl(src / "d" / "a.jsonl", [{"body": t} for t in _docs("d", 50, 0)])
    args = [str(src), "--out", str(tmp_path / "o"), "--workers", "0", "--text-field", "body"]
    assert P.main(args) == 0
    assert "d/train:" in capsys.readouterr().out
    nested = tmp_path / "nested"
    nested.mkdir()
    _write_jsonl(nested / "n.jsonl", [{"text": f"doc {i}", "meta": {"set": ["web", "books"][i % 2]}}
                                      for i in range(40)])
    assert P.main([str(nested), "--out", str(tmp_path / "n"), "--workers", "0",
                   "--domain-field", "meta.set"]) == 0
    assert P.read_manifest(tmp_path / "n")["domains"] == ["books", "web"]
    assert P.main([str(src), "--out", str(tmp_path / "o2"), "--workers", "0"]) == 2
    assert "d/a.jsonl record 0: expected a string field 'text' (--text-field)" in capsys.readouterr().err


def _bad_source(tmp_path, name, rows=None, table=None):
    src = tmp_path / name
    src.mkdir()
    if rows is not None:
        _write_jsonl(src / "x.jsonl", rows)
    if table is not None:
        (src / "dom").mkdir()
        pq.write_table(table, src / "dom" / "t.parquet")
    return src


@pytest.mark.parametrize("name, rows, table, match", [
    ("empty", None, None, "holds no \\*.jsonl"),
    ("nodomain", [{"text": "a"}], None, "x.jsonl record 0: expected a string field 'domain' "
                                         "\\(--domain-field\\)"),
    ("badjson", None, None, None),
    ("baddomain", [{"text": "a", "domain": "../etc"}], None, "x.jsonl record 0: domain '../etc'"),
    ("nocolumn", None, pa.table({"body": ["a"]}), "dom/t.parquet: no column 'text' \\(--text-field\\)"),
])
def test_bad_sources_name_the_file_record_and_field(tmp_path, name, rows, table, match):
    src = _bad_source(tmp_path, name, rows, table)
    if name == "badjson":
        (src / "x.jsonl").write_text('{"text": "a", "domain": "d"}\nnot json\n')
        match = "x.jsonl record 1: not a JSON object"
    with pytest.raises(P.PrepareError, match=match):
        P.prepare(str(src), str(tmp_path / "out"), workers=0, progress=False)


def test_bad_outputs_and_changed_sources_name_the_fix(tmp_path):
    src = _bad_source(tmp_path, "s", [{"text": f"doc {i}", "domain": "d"} for i in range(30)])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(P.PrepareError, match="non-empty directory without a manifest.json"):
        P.prepare(str(src), str(busy), workers=0, progress=False)
    with pytest.raises(P.PrepareError, match="--val-fraction=0.7"):
        P.prepare(str(src), str(tmp_path / "o"), val_fraction=0.7, workers=0, progress=False)
    with pytest.raises(P.PrepareError, match="--tokenizer='nope.json'"):
        P.prepare(str(src), str(tmp_path / "o"), "nope.json", workers=0, progress=False)
    P.prepare(str(src), str(tmp_path / "o"), workers=0, progress=False)
    with pytest.raises(P.PrepareError, match="prepared with --val-fraction 0.01, not 0.2"):
        P.prepare(str(src), str(tmp_path / "o"), val_fraction=0.2, workers=0, progress=False)
    _write_jsonl(src / "x.jsonl", [{"text": "changed", "domain": "d"}])
    with pytest.raises(P.PrepareError, match="source file x.jsonl changed"):
        P.prepare(str(src), str(tmp_path / "o"), workers=0, progress=False)


def test_stream_writer_reopened_drops_what_was_written_past_the_commit(tmp_path, monkeypatch):
    """An interrupted run wrote more than a resumed one writes again (its unfinished source file
    shrank): the reopened stream holds exactly the committed documents plus the new ones."""
    monkeypatch.setattr(store_lib, "CHUNK", 16)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 259, rng.integers(0, 40)).astype(np.int32) for _ in range(60)]

    def append(w, ds):
        w.append(np.array([len(d) for d in ds]), np.concatenate(ds))

    w = store_lib.StreamWriter(tmp_path / "s", 1, 2)
    append(w, docs[:20])
    committed = w.commit()
    append(w, docs[20:60])  # the interrupted file: reaches the disk, never committed
    w._tokens.flush(), w._offsets.flush()
    w = store_lib.StreamWriter(tmp_path / "s", 1, 2, committed=committed)
    append(w, docs[20:25])  # the rerun of that file, now shorter
    w.commit()
    s = TokenStore(tmp_path / "s")
    assert len(s) == 25 and len(s.offsets) == 26
    for k in range(25):
        np.testing.assert_array_equal(s[k], np.r_[1, docs[k], 2])
    assert s.num_tokens == sum(len(d) + 2 for d in docs[:25])


def test_gs_source_and_output(source, prepared, gcs):
    """SRC and DIR in a bucket (the local GCS stand-in of test_run_gcs): the same streams as the
    local preparation, and the pipeline opens ``gs://`` directly. ArrayRecord is read locally only."""
    import shutil

    from test_run_gcs import BUCKET

    root, objects = gcs
    shutil.copytree(source[0], f"{root}/src", ignore=shutil.ignore_patterns("*.array_record"))
    m = P.prepare(f"gs://{BUCKET}/src", f"gs://{BUCKET}/out", val_fraction=VAL, workers=0,
                  progress=False)
    assert sorted(m["files"]) == sorted(set(prepared[1]["files"]) - {"m0.array_record"})
    assert any(n.startswith("out/code/train/tokens/") for n in objects.uploads)  # tensorstore gcs
    assert not os.path.exists("gs:"), "nothing may land in a local folder named after the URI"
    local = _arrays(prepared[0])
    for key in ("code/train", "prose/val"):
        got = read_stream(f"gs://{BUCKET}/out", key)
        np.testing.assert_array_equal(got[0], local[key][0])
        np.testing.assert_array_equal(got[1], local[key][1])
    data = prepare_data(DataConfig(corpus=f"gs://{BUCKET}/out", domains=DOMAINS, seq_len=32))
    assert data.num_docs("prose", "val") == prepared[1]["streams"]["prose/val"]["docs"]
    assert data.train_row(0)["inputs"].shape == (32,)
