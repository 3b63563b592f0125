"""The grain input pipeline: cached token streams -> packed, per-process batches with a mixture.

``prepare_data`` builds (once) and opens the corpus, tokenizer and token streams. The training
stream is a keyed domain mixture (``moejax.data.mixture``): global row ``i`` takes the domain its
seeded uniform draw picks under the current weights (``data.mixture`` until a mixer changes them)
and that domain's next row, a window of ``seq_len + 1`` tokens in a seeded per-epoch permutation
of the domain's windows (concat-then-split packing, so rows cross document boundaries). Global
batch k is rows [k*B, (k+1)*B); process p of P reads only its contiguous B/P of them, so the
global batch is the same for every P. Iterator state (weights, per-domain positions by name) is a
grain ``DatasetIterator``'s (``get_state``/``set_state``, orbax via ``grain.checkpoint``).

Row fields (T = seq_len): ``inputs``/``targets`` (targets = inputs shifted by one), ``segment_ids``
(1, 2, 3, ... per document piece in the row; 0 on padding), ``positions`` (0 at every document
start *and* at the row start: a row beginning mid-document starts at 0, not at its true offset, so
positions stay < seq_len <= model.max_seq_len; RoPE only sees relative offsets, so nothing is lost),
``loss_mask`` (0 where the target lies in another document than the input, or is padding) and
``domain`` (index into ``cfg.domains``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moejax.config import DataConfig
from moejax.data import corpus as corpus_lib
from moejax.data.mixture import DomainStream, Mixture, MixtureIterator
from moejax.data.store import TokenStore, write_stream
from moejax.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

DATA_VERSION = 1  # bump when the token-stream layout changes
SPLITS = ("train", "val")


# -- rows ---------------------------------------------------------------------------------------

def make_row(store: TokenStore, start: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The packed row of ``seq_len + 1`` stream tokens from ``start`` (padded past the end)."""
    toks = store.read(start, seq_len + 1)
    n = len(toks)  # real tokens; n < seq_len + 1 only at the end of a (validation) stream
    pos = start + np.arange(n)
    doc = store.doc_index(pos)
    seg = doc - (doc[0] if n else 0) + 1
    position = pos - np.maximum(store.offsets[doc], start)
    same_doc = (doc[1:] == doc[:-1]).astype(np.float32)
    full = np.full(seq_len + 1, pad_id, np.int32)
    full[:n] = toks
    seg_full, pos_full = np.zeros(seq_len + 1, np.int32), np.zeros(seq_len + 1, np.int32)
    seg_full[:n], pos_full[:n] = seg, position
    mask = np.zeros(seq_len, np.float32)
    mask[:max(n - 1, 0)] = same_doc
    return {"inputs": full[:-1], "targets": full[1:], "segment_ids": seg_full[:-1],
            "positions": pos_full[:-1], "loss_mask": mask}


def local_rows(k: int, global_batch: int, process_index: int, process_count: int) -> range:
    """Global row indices of process ``p``'s slice of global batch ``k``."""
    b = _local_batch(global_batch, process_count)
    first = k * global_batch + process_index * b
    return range(first, first + b)


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                         f"process_count={process_count}")
    return global_batch // process_count


# -- the prepared data --------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    """Opened, cached data: tokenizer, per-(domain, split) token streams, batch iterators."""

    cfg: DataConfig
    tokenizer: Tokenizer
    stores: dict[tuple[str, str], TokenStore]
    path: Path
    # (mixture, (domains, positions)) of the first rows under data.mixture, for ``_row_choice``
    _static_plan: tuple | None = dataclasses.field(default=None, init=False, repr=False,
                                                   compare=False)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.cfg.domains)

    def num_tokens(self, domain: str, split: str = "train") -> int:
        return self.stores[(domain, split)].num_tokens

    def num_docs(self, domain: str, split: str = "train") -> int:
        return len(self.stores[(domain, split)])

    def token_counts(self, vocab_size: int, split: str = "train") -> np.ndarray:
        """Occurrences of every token id over all domains' ``split`` streams: [vocab_size] int64
        (MaskMoE ranks ids by corpus frequency)."""
        counts = np.zeros(vocab_size, np.int64)
        for d in self.domains:
            store = self.stores[(d, split)]
            counts += np.bincount(store.read(0, store.num_tokens), minlength=vocab_size)[:vocab_size]
        return counts

    # training stream -----------------------------------------------------------------------
    def train_mixture(self) -> Mixture:
        """A fresh ``Mixture`` of the training streams under ``data.mixture`` (row 0, no weight
        changes yet): one ``DomainStream`` per domain, keyed by name."""
        streams = [DomainStream(d, self.num_tokens(d, "train"), self.cfg.seq_len, self.cfg.seed)
                   for d in self.domains]
        return Mixture(streams, dict(zip(self.domains, self.cfg.mixture)), self.cfg.seed)

    def _row_choice(self, i: int) -> tuple[int, int]:
        """(domain index, start offset) of global training row ``i`` while the weights stay at
        ``data.mixture`` (replayed from row 0 and cached, growing by doubling)."""
        if self._static_plan is None or i >= len(self._static_plan[1][0]):
            mixture = self.train_mixture() if self._static_plan is None else self._static_plan[0]
            self._static_plan = (mixture, mixture.replay(max(2 * i + 2, 4096)))
        mixture, (domains, positions) = self._static_plan
        return int(domains[i]), mixture.starts(domains[i:i + 1], positions[i:i + 1])[0]

    def train_row(self, i: int) -> dict[str, np.ndarray]:
        """Global training row ``i`` while the weights stay at ``data.mixture``."""
        d, start = self._row_choice(i)
        row = self._read_train_row(self.domains[d], start)
        row["domain"] = np.int32(d)
        return row

    def _read_train_row(self, domain: str, start: int) -> dict[str, np.ndarray]:
        return make_row(self.stores[(domain, "train")], start, self.cfg.seq_len,
                        self.tokenizer.pad_id)

    def train_iterator(self, global_batch: int, process_index: int = 0,
                       process_count: int = 1) -> MixtureIterator:
        """A checkpointable iterator of local batches (``global_batch / process_count`` rows)
        whose domain weights may change mid-run (``set_weights``; see moejax.data.mixture)."""
        return MixtureIterator(self.train_mixture(), self._read_train_row, global_batch,
                               process_index, process_count, threads=self.cfg.prefetch_threads)

    # validation -----------------------------------------------------------------------------
    def num_eval_rows(self, domain: str) -> int:
        """Rows the held-out split of ``domain`` yields: windows of ``seq_len + 1`` tokens with
        stride ``seq_len`` that hold at least one target (the last one may be padded)."""
        return -(-max(self.num_tokens(domain, "val") - 1, 0) // self.cfg.seq_len)

    def num_eval_batches(self, domain: str, global_batch: int) -> int:
        """Global batches covering every eval row of ``domain`` (the last may be padded)."""
        return -(-self.num_eval_rows(domain) // global_batch)

    def eval_batches(self, domain: str, num_batches: int, global_batch: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
        """Fixed held-out batches: global row w is the window at token w*seq_len of the val stream.

        Windows of ``seq_len + 1`` tokens with stride ``seq_len`` (each target predicted once).
        At most ``num_eval_batches(domain, global_batch)`` batches, whatever ``num_batches`` asks:
        none is all padding; rows of the last one past the end of the stream are padding with
        ``loss_mask`` 0. Every process gets the same number of batches.
        """
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; configured: {self.domains}")
        store, d = self.stores[(domain, "val")], self.domains.index(domain)
        out = []
        for k in range(min(num_batches, self.num_eval_batches(domain, global_batch))):
            rows = [make_row(store, w * self.cfg.seq_len, self.cfg.seq_len, self.tokenizer.pad_id)
                    for w in local_rows(k, global_batch, process_index, process_count)]
            batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
            batch["domain"] = np.full(len(rows), d, np.int32)
            out.append(batch)
        return out


# -- build and open -----------------------------------------------------------------------------

def _tokenizer_id(cfg: DataConfig):
    if cfg.tokenizer == "byte":
        return "byte"
    if cfg.tokenizer == "bpe":
        return {"bpe": cfg.bpe_vocab_size}
    p = Path(os.path.expanduser(cfg.tokenizer))
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer!r}: expected 'byte', 'bpe' or a "
                                f"path to a tokenizer.json file, but {p} does not exist")
    return {"file": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def data_key(cfg: DataConfig) -> str:
    """Cache key of the token streams: everything that changes their contents, nothing else."""
    if cfg.corpus == "embedded":
        corpus_lib.check_embedded_domains(cfg.domains)
        src = {"embedded": [corpus_lib.embedded_key(d, cfg.corpus_bytes_per_domain)
                            for d in cfg.domains]}
    else:
        d = Path(os.path.expanduser(cfg.corpus)).resolve()
        src = {"dir": str(d), "files": corpus_lib.local_fingerprint(cfg.corpus, cfg.domains)}
    return corpus_lib.stable_hash({"v": DATA_VERSION, "src": src, "domains": list(cfg.domains),
                                   "tokenizer": _tokenizer_id(cfg), "val": cfg.val_fraction,
                                   "seed": cfg.seed})


def _build(cfg: DataConfig, root: Path, final: Path) -> None:
    """Build corpus splits, tokenizer and token streams into a temp dir, then publish atomically."""
    t0 = time.time()
    splits = {}
    for dom in cfg.domains:
        docs = corpus_lib.load_documents(cfg.corpus, dom, cfg.corpus_bytes_per_domain, cfg.cache_dir)
        splits[dom] = dict(zip(SPLITS, corpus_lib.split_documents(docs, dom, cfg.val_fraction,
                                                                   cfg.seed)))
    tmp = corpus_lib.make_tmp(root, "data")
    try:
        if cfg.tokenizer == "byte":
            tok = ByteTokenizer()
        elif cfg.tokenizer == "bpe":
            texts = [t for dom in cfg.domains for t in splits[dom]["train"]]
            tok = load_tokenizer(cfg, train_texts=texts, trained_path=tmp / "tokenizer.json")
        else:
            shutil.copyfile(os.path.expanduser(cfg.tokenizer), tmp / "tokenizer.json")
            tok = BPETokenizer.from_file(tmp / "tokenizer.json")
        meta = {"config": dataclasses.asdict(cfg), "python": sys.version, "vocab_size": tok.vocab_size,
                "streams": {}}
        total = sum(len(s) for dom in cfg.domains for s in splits[dom].values())
        with tqdm(total=total, desc="tokenize", unit="doc", leave=False) as bar:
            for dom in cfg.domains:
                for split, docs in splits[dom].items():
                    ids = []
                    for i in range(0, len(docs), 1024):
                        ids += tok.encode_batch(docs[i:i + 1024])
                        bar.update(len(docs[i:i + 1024]))
                    n = write_stream(tmp / dom / split, ids, tok.bos_id, tok.eos_id)
                    meta["streams"][f"{dom}/{split}"] = {"docs": len(docs), "tokens": n}
        meta["build_seconds"] = round(time.time() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    corpus_lib.publish(tmp, final)


def open_data(cfg: DataConfig, path: Path) -> Data:
    """Open a published data dir read-only."""
    tok = ByteTokenizer() if cfg.tokenizer == "byte" else BPETokenizer.from_file(path / "tokenizer.json")
    stores = {(d, s): TokenStore(path / d / s) for d in cfg.domains for s in SPLITS}
    return Data(cfg=cfg, tokenizer=tok, stores=stores, path=path)


_TOKENIZER_KIND = {"byte": "byte", "bpe": "bpe"}  # any other data.tokenizer is a file: "file"


def open_prepared(cfg: DataConfig) -> Data:
    """Open a directory written by ``python -m moejax.data.prepare`` (local or ``gs://``): domains,
    splits and tokenizer come from its manifest; ``data.domains`` must be among its domains."""
    from etils import epath

    from moejax.data.prepare import read_manifest

    path = epath.Path(os.path.expanduser(cfg.corpus))
    m = read_manifest(path)
    if not m.get("complete"):
        raise ValueError(f"data.corpus={cfg.corpus!r}: its preparation did not finish; rerun "
                         f"python -m moejax.data.prepare with the same arguments to complete it")
    unknown = [d for d in cfg.domains if d not in m["domains"]]
    if unknown:
        raise ValueError(f"data.domains: {unknown} not in the prepared corpus {cfg.corpus} (it has "
                         f"{m['domains']}); set data.domains (and data.mixture) to some of those")
    kind = m["tokenizer"]["kind"]
    if _TOKENIZER_KIND.get(cfg.tokenizer, "file") != kind:
        fix = kind if kind != "file" else f"{cfg.corpus}/tokenizer.json"
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}, but {cfg.corpus} was prepared with the "
                         f"{kind} tokenizer; set data.tokenizer={fix}")
    if kind == "byte":
        tok = ByteTokenizer()
    else:
        from tokenizers import Tokenizer as HFTokenizer

        tok_path = path / "tokenizer.json"
        tok = BPETokenizer(HFTokenizer.from_str(tok_path.read_text()), tok_path)
    stores = {(d, s): TokenStore(path / d / s) for d in cfg.domains for s in SPLITS}
    return Data(cfg=cfg, tokenizer=tok, stores=stores, path=path)


def prepare_data(cfg: DataConfig, vocab_size: int | None = None) -> Data:
    """Build (first call) or open (later calls, < 1 s) the data ``cfg`` describes.

    Cached under ``cfg.cache_dir/data-<key>/``; concurrent builders are safe (atomic rename, the
    loser uses the winner's copy). A ``data.corpus`` prepared by ``moejax.data.prepare`` is opened
    in place. Raises if the tokenizer's vocabulary exceeds ``vocab_size``.
    """
    from moejax.data.prepare import is_prepared

    if is_prepared(cfg.corpus):
        data = open_prepared(cfg)
    else:
        root = corpus_lib.cache_root(cfg.cache_dir)
        final = root / f"data-{data_key(cfg)}"
        if not (final / "meta.json").exists():
            _build(cfg, root, final)
        data = open_data(cfg, final)
    if vocab_size is not None and data.tokenizer.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({data.tokenizer.vocab_size}, data.tokenizer={cfg.tokenizer!r}); raise it")
    return data
