"""Token streams in tensorstore (zarr): one flat int32 array per (domain, split) plus doc offsets.

Each document is stored as ``[bos] + tokens + [eos]``; ``offsets`` (int64, num_docs + 1) holds the
document starts and the total length. Written once into the cache, then opened read-only;
``TokenStore`` is a grain ``RandomAccessDataSource`` over documents and reads raw token windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorstore as ts
from etils import epath

CHUNK = 1 << 16  # tokens per zarr chunk: a row read touches one or two chunks
_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}
# One shared chunk cache: after warm-up random row reads rarely decompress anything.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


_DTYPES = {np.dtype(np.int32): "<i4", np.dtype(np.int64): "<i8"}


def _kvstore(path) -> dict:
    """A tensorstore kvstore spec for a local path or a ``gs://bucket/key`` URL."""
    s = str(path)
    if s.startswith("gs://"):
        bucket, _, key = s[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key}
    return {"driver": "file", "path": s}


def _spec(path) -> dict:
    return {"driver": "zarr", "kvstore": _kvstore(path)}


def _write_array(path: Path, arr: np.ndarray) -> None:
    dtype = _DTYPES[arr.dtype]
    meta = {"dtype": dtype, "shape": [len(arr)], "chunks": [max(1, min(CHUNK, len(arr)))],
            "compressor": _COMPRESSOR}
    store = ts.open({**_spec(path), "metadata": meta}, create=True).result()
    store.write(arr).result()


def write_stream(path: Path, docs: Sequence[np.ndarray], bos_id: int, eos_id: int) -> int:
    """Write the tokenised ``docs`` as ``path/{tokens,offsets}``; returns the token count."""
    lengths = np.array([len(d) + 2 for d in docs], np.int64)
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), np.int32)
    for d, start in zip(docs, offsets[:-1]):
        tokens[start] = bos_id
        tokens[start + 1:start + 1 + len(d)] = d
        tokens[start + 1 + len(d)] = eos_id
    path.mkdir(parents=True, exist_ok=True)
    _write_array(path / "tokens", tokens)
    _write_array(path / "offsets", offsets)
    return len(tokens)


class _AppendArray:
    """A growable 1-D zarr array: values are buffered and written in whole chunks."""

    def __init__(self, path, dtype, length: int, create: bool):
        meta = {"dtype": _DTYPES[np.dtype(dtype)], "shape": [0], "chunks": [CHUNK],
                "compressor": _COMPRESSOR}
        spec = {**_spec(path), "metadata": meta} if create else _spec(path)
        self._arr = ts.open(spec, create=create, open=not create, delete_existing=create, read=True,
                            write=True).result()
        if self._arr.shape[0] < length:
            raise ValueError(f"token store {path}: holds {self._arr.shape[0]} values, fewer than the "
                             f"{length} the manifest committed; delete the output and prepare again")
        if self._arr.shape[0] > length:  # the tail of an interrupted write: drop it
            self._arr = self._arr.resize(exclusive_max=[length], shrink_only=True).result()
        self.length = length
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._dtype = np.dtype(dtype)

    def append(self, values: np.ndarray) -> None:
        self._buf.append(np.asarray(values, self._dtype))
        self._buffered += len(values)
        if self._buffered >= 4 * CHUNK:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        """Write the buffer (only up to a chunk boundary if ``whole_chunks``: no chunk rewritten)."""
        if not self._buffered:
            return
        vals = np.concatenate(self._buf)
        end = self.length + len(vals)
        if whole_chunks:
            end -= end % CHUNK
        n = end - self.length
        if n <= 0:
            return
        self._arr = self._arr.resize(exclusive_max=[end], expand_only=True).result()
        self._arr[self.length:end].write(vals[:n]).result()
        self.length = end
        self._buf, self._buffered = ([vals[n:]] if n < len(vals) else []), len(vals) - n


class StreamWriter:
    """Appends documents to one token stream (the ``TokenStore`` layout), resumably.

    ``committed=None`` starts a new stream (replacing any leftover); ``committed=(docs, tokens)``
    reopens one at what an earlier run committed, dropping whatever it wrote past that.
    ``commit()`` makes everything appended so far durable.
    """

    def __init__(self, path, bos_id: int, eos_id: int, committed: tuple[int, int] | None = None):
        self.path = epath.Path(path)
        create = committed is None
        docs, tokens = committed or (0, 0)
        if not create and not (self.path / "offsets").exists():
            raise FileNotFoundError(f"token store {self.path}: missing, but the manifest records "
                                    f"{docs} documents; delete the output and prepare again")
        self.path.mkdir(parents=True, exist_ok=True)
        self._tokens = _AppendArray(self.path / "tokens", np.int32, tokens, create)
        self._offsets = _AppendArray(self.path / "offsets", np.int64, 0 if create else docs + 1,
                                     create)
        if create:
            self._offsets.append(np.zeros(1, np.int64))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.docs, self.tokens = docs, tokens

    def append(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        """Append documents given as their token ``lengths`` [n] and concatenated tokens ``flat``;
        each is stored as ``[bos] + tokens + [eos]``."""
        lengths = np.asarray(lengths, np.int64)
        if not len(lengths):
            return
        framed = frame_documents(lengths, flat, self.bos_id, self.eos_id)
        self._offsets.append(self.tokens + np.cumsum(lengths + 2))
        self._tokens.append(framed)
        self.docs += len(lengths)
        self.tokens += len(framed)

    def commit(self) -> tuple[int, int]:
        """Write every buffered value; returns the durable ``(docs, tokens)``."""
        self._tokens.flush()
        self._offsets.flush()
        return self.docs, self.tokens


def frame_documents(lengths: np.ndarray, flat: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """``[bos] + doc + [eos]`` for every document of ``flat`` (split by ``lengths``), concatenated."""
    n = len(lengths)
    out = np.empty(len(flat) + 2 * n, np.int32)
    ends = np.cumsum(lengths + 2)  # exclusive end of each framed doc
    starts = ends - lengths - 2
    out[starts] = bos_id
    out[ends - 1] = eos_id
    body = np.ones(len(out), bool)
    body[starts] = body[ends - 1] = False
    out[body] = flat
    return out


class TokenStore:
    """Read-only view of one token stream: ``store[k]`` is document k, ``read(s, n)`` a window."""

    def __init__(self, path):
        self.path = epath.Path(path)
        if not (self.path / "tokens").exists() or not (self.path / "offsets").exists():
            raise FileNotFoundError(f"token store {self.path}: expected zarr arrays 'tokens' and "
                                    "'offsets' (written by moejax.data.prepare_data or "
                                    "python -m moejax.data.prepare)")
        self._tokens = ts.open(_spec(self.path / "tokens"), read=True, open=True,
                               context=_CONTEXT).result()
        offsets = ts.open(_spec(self.path / "offsets"), read=True, open=True,
                          context=_CONTEXT).result()
        self.offsets: np.ndarray = offsets.read().result()  # small; kept in memory
        self.doc_starts = self.offsets[:-1]
        self.num_tokens = int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        """Document ``k`` as stored, ``[bos] + tokens + [eos]`` (grain RandomAccessDataSource)."""
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"document {k} out of range for {len(self)} documents")
        k %= len(self)
        return self.read(int(self.offsets[k]), int(self.offsets[k + 1] - self.offsets[k]))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` clipped to the stream (may be shorter at the end)."""
        stop = min(start + length, self.num_tokens)
        if start >= stop:
            return np.zeros(0, np.int32)
        return self._tokens[start:stop].read().result()

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document holding each stream position."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def __repr__(self) -> str:
        return f"TokenStore({self.path}, docs={len(self)}, tokens={self.num_tokens})"
