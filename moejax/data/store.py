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

CHUNK = 1 << 16  # tokens per zarr chunk: a row read touches one or two chunks
_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}
# One shared chunk cache: after warm-up random row reads rarely decompress anything.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


def _spec(path: Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def _write_array(path: Path, arr: np.ndarray) -> None:
    dtype = {np.dtype(np.int32): "<i4", np.dtype(np.int64): "<i8"}[arr.dtype]
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


class TokenStore:
    """Read-only view of one token stream: ``store[k]`` is document k, ``read(s, n)`` a window."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "tokens").is_dir() or not (self.path / "offsets").is_dir():
            raise FileNotFoundError(f"token store {self.path}: expected zarr arrays 'tokens' and "
                                    "'offsets' (written by moejax.data.prepare_data)")
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
