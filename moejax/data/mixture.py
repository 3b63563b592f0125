"""Keyed domain mixtures: the training stream whose domain weights may change during a run.

Three pieces, each a pure function of its inputs so a run resumes exactly:

- ``DomainStream``: row ``j`` of one domain is a window of ``seq_len + 1`` tokens of its token
  store. Epoch ``e = j // W`` visits the domain's ``W`` windows (stride ``seq_len``, shifted by a
  per-epoch phase) in a seeded permutation (numpy's; grain's ``index_shuffle`` past 65536 windows,
  O(1) memory for any corpus), so within an epoch no window repeats; a function of (seed, domain
  name, j).
- ``Mixture``: the chooser. Global row ``i`` draws a uniform ``u_i`` (a function of (seed, i)
  only) and takes the domain whose interval of the *current* weights' CDF holds it; the row is
  that domain's next row (its *position*). State = {weights, per-domain positions, rows emitted},
  keyed by domain name and JSON-ready; a state restores into a mixture with other domains by name.
- ``MixtureIterator``: a grain ``DatasetIterator`` of per-process batches (global batch ``k`` is
  rows ``[kB, (k+1)B)``; process ``p`` of ``P`` reads rows ``p*B/P ...`` of it, so the global batch
  is the same for every ``P``). ``set_weights`` applies from the next batch handed out: planned
  but not yet handed-out batches are dropped and re-planned, so prefetch threads never change
  which rows come out. ``get_state``/``set_state`` work with ``grain.checkpoint`` and carry an
  attached mixer's state, so one checkpoint item holds all mixing state.

grain (which imports jax, seconds) is imported on first use, not with this module, so
``import moejax.data`` stays light for ``python -m moejax.data.prepare`` and its workers.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

STATE_VERSION = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


# -- seeded, counter-based randomness -------------------------------------------------------------

class IteratorStateError(ValueError):
    """A saved data-iterator state this stream cannot resume (another version's training stream):
    the checkpoint is intact but incompatible, so it must not be set aside as damaged."""


def _hash64(*parts) -> int:
    """A stable 64-bit key of ``parts`` (blake2b of their text; no Python hash randomisation)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, first: int, n: int) -> np.ndarray:
    """Uniforms in [0, 1) of global rows ``[first, first + n)``: [n] float64, a function of
    (seed, row) only (the splitmix64 sequence keyed by the seed), so weights never move them."""
    key = np.uint64(_hash64("mixture-rows", seed))
    rows = np.arange(first + 1, first + n + 1, dtype=np.uint64)
    return (_splitmix64(key + rows * _GOLDEN) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


SMALL_EPOCH = 1 << 16  # windows up to which an epoch's permutation is held as an array


@functools.cache
def _index_shuffle() -> Callable[..., int]:
    """grain's ``index_shuffle`` (a seeded bijection of [0, max_index]), imported on first use."""
    import grain
    return grain.experimental.index_shuffle


@functools.lru_cache(maxsize=64)
def _small_permutation(perm_seed: int, num_windows: int) -> np.ndarray:
    """A seeded permutation of ``num_windows <= SMALL_EPOCH`` windows ([W] int32, <= 256 KiB):
    grain's ``index_shuffle`` takes milliseconds per index on small ranges."""
    return np.random.default_rng(perm_seed).permutation(num_windows).astype(np.int32)


def shuffled_window(k: int, num_windows: int, perm_seed: int) -> int:
    """Position ``k`` of the seeded permutation of ``[0, num_windows)``: an array for small
    ranges, grain's ``index_shuffle`` (O(1) memory) for large ones."""
    if num_windows <= SMALL_EPOCH:
        return int(_small_permutation(perm_seed, num_windows)[k])
    return _index_shuffle()(k, max_index=num_windows - 1, seed=perm_seed, rounds=4)


@functools.lru_cache(maxsize=256)
def _epoch_params(seed: int, name: str, epoch: int, max_phase: int) -> tuple[int, int]:
    """(permutation seed < 2**32, window phase in [0, max_phase]) of one domain's epoch."""
    return (_hash64("mixture-perm", seed, name, epoch) % 2**32,
            _hash64("mixture-phase", seed, name, epoch) % (max_phase + 1))


# -- one domain's rows ----------------------------------------------------------------------------

class DomainStream:
    """The endless row sequence of one domain: row ``j`` starts at ``start(j)`` in its token store.

    ``W`` windows of ``seq_len + 1`` tokens at stride ``seq_len`` from a per-epoch phase in
    ``[0, seq_len)`` (one window fewer than fit at phase 0, so every phase fits; different
    epochs cut the documents differently), visited in a seeded per-epoch permutation.
    """

    def __init__(self, name: str, num_tokens: int, seq_len: int, seed: int):
        self.name, self.num_tokens, self.seq_len, self.seed = name, int(num_tokens), seq_len, seed
        full = (self.num_tokens - 1) // seq_len  # windows at phase 0
        self.num_windows = 0 if full < 1 else max(full - 1, 1)
        self.max_phase = (0 if full < 1 else
                          min(seq_len - 1, self.num_tokens - 1 - self.num_windows * seq_len))

    def start(self, j: int) -> int:
        """Token offset of row ``j`` (its window is ``[start, start + seq_len + 1)``)."""
        if self.num_windows == 0:
            raise ValueError(f"domain {self.name!r} has {self.num_tokens} training tokens, fewer "
                             f"than data.seq_len+1={self.seq_len + 1}; lower seq_len or its weight")
        epoch, k = divmod(int(j), self.num_windows)
        perm_seed, phase = _epoch_params(self.seed, self.name, epoch, self.max_phase)
        w = shuffled_window(k, self.num_windows, perm_seed)
        return phase + w * self.seq_len


# -- the chooser ----------------------------------------------------------------------------------

def check_weights(weights: Mapping[str, float], streams: Mapping[str, DomainStream]) -> dict:
    """``weights`` as ``{name: float}`` in ``streams``' order, or ValueError naming the domain:
    an unknown or missing domain, a negative or non-finite weight, all zero, or a positive weight
    on a domain too short for one row."""
    names = list(streams)
    unknown = [k for k in weights if k not in streams]
    if unknown:
        raise ValueError(f"mixture weights name unknown domain(s) {unknown}; the domains are "
                         f"{names}")
    missing = [k for k in names if k not in weights]
    if missing:
        raise ValueError(f"mixture weights give no weight for domain(s) {missing}; give one "
                         f"for each of {names} (0 leaves a domain out)")
    out = {}
    for k in names:
        try:
            w = float(weights[k])
        except (TypeError, ValueError):
            raise ValueError(f"mixture weight of domain {k!r} is {weights[k]!r}: must be a "
                             "number >= 0") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"mixture weight of domain {k!r} is {w}: must be finite and >= 0")
        out[k] = w
    if sum(out.values()) <= 0:
        raise ValueError(f"mixture weights are all zero ({out}): give at least one of the domains "
                         f"{names} a positive weight")
    for k, w in out.items():
        if w > 0 and streams[k].num_windows == 0:
            streams[k].start(0)  # raises, naming the domain and the fix
    return out


class Mixture:
    """Domain and in-domain position of every global training row, under weights that may change.

    The planning cursor is (rows taken, per-domain positions); ``take(n)`` advances it. Weights
    act on rows not yet taken; ``MixtureIterator`` rewinds the cursor to what it handed out
    before changing them.
    """

    def __init__(self, streams: Sequence[DomainStream], weights: Mapping[str, float], seed: int):
        self.streams = {s.name: s for s in streams}
        if len(self.streams) != len(streams):
            raise ValueError(f"mixture domains must be distinct: {[s.name for s in streams]}")
        self.names = tuple(self.streams)
        self.seed = seed
        self.base_weights = check_weights(weights, self.streams)  # as constructed (the config)
        self._w = np.array([self.base_weights[k] for k in self.names], np.float64)
        self.rows = 0
        self.positions = np.zeros(len(self.names), np.int64)

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self._w.tolist()))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Weights for the rows not yet taken (one per domain, >= 0, not all zero)."""
        w = check_weights(weights, self.streams)
        self._w = np.array([w[k] for k in self.names], np.float64)

    def choose(self, u: np.ndarray) -> np.ndarray:
        """Domain index [n] of uniforms ``u`` [n]: inverse CDF of the current weights (a
        zero-weight domain owns an empty interval and is never chosen)."""
        cdf = np.cumsum(self._w) / self._w.sum()
        d = np.searchsorted(cdf, u, side="right")
        return np.minimum(d, int(np.flatnonzero(self._w)[-1])).astype(np.int32)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index [n] int32, position in that domain [n] int64) of the next ``n`` rows."""
        domains = self.choose(row_uniforms(self.seed, self.rows, n))
        positions = np.empty(n, np.int64)
        for d in range(len(self.names)):
            rows = np.flatnonzero(domains == d)
            positions[rows] = self.positions[d] + np.arange(len(rows))
            self.positions[d] += len(rows)
        self.rows += n
        return domains, positions

    def starts(self, domains: np.ndarray, positions: np.ndarray) -> list[int]:
        """Token offset of each (domain index, position) row in its domain's store."""
        return [self.streams[self.names[d]].start(j) for d, j in zip(domains, positions)]

    # cursor and state -------------------------------------------------------------------------
    def cursor(self) -> tuple[int, np.ndarray]:
        return self.rows, self.positions.copy()

    def seek(self, cursor: tuple[int, np.ndarray]) -> None:
        self.rows, self.positions = cursor[0], cursor[1].copy()

    def state(self, cursor: tuple[int, np.ndarray] | None = None) -> dict[str, Any]:
        """JSON-ready state at ``cursor`` (default: the planning cursor), keyed by domain name."""
        rows, positions = self.cursor() if cursor is None else cursor
        return {"version": STATE_VERSION, "seed": self.seed, "rows": int(rows),
                "weights": self.weights, "base_weights": dict(self.base_weights),
                "positions": {k: int(p) for k, p in zip(self.names, positions)}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``state`` by domain name: a domain it lacks starts at position 0, one it has
        that this mixture lacks is dropped (both logged). Its weights are restored when this
        mixture was built with the same weights as the saved one; otherwise (domains added,
        removed or reweighted) the weights this mixture was built with apply (logged)."""
        saved_pos = dict(state["positions"])
        added = [k for k in self.names if k not in saved_pos]
        removed = [k for k in saved_pos if k not in self.streams]
        if added or removed:
            log.warning("mixture state restored by domain name: new domain(s) %s start at "
                        "position 0; saved domain(s) %s dropped", added, removed)
        if int(state.get("seed", self.seed)) != self.seed:
            log.warning("mixture state was saved with seed %s, restored with seed %s: rows "
                        "from here on follow the new seed", state["seed"], self.seed)
        self.rows = int(state["rows"])
        self.positions = np.array([int(saved_pos.get(k, 0)) for k in self.names], np.int64)
        if dict(state.get("base_weights", {})) == self.base_weights:
            self.set_weights(state["weights"])
        else:
            self._w = np.array([self.base_weights[k] for k in self.names], np.float64)
            log.warning("the configured mixture %s differs from the checkpoint's %s: its weights "
                        "apply from here on, not the checkpoint's current weights %s",
                        self.base_weights, state.get("base_weights"), state.get("weights"))

    def replay(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(domains, positions) of rows ``[0, n)`` under the current weights, never changed:
        the static-mixture stream (the cursor is left where it was)."""
        saved = self.cursor()
        self.seek((0, np.zeros_like(self.positions)))
        try:
            return self.take(n)
        finally:
            self.seek(saved)


# -- the iterator ---------------------------------------------------------------------------------

class Mixer(Protocol):
    """What ``MixtureIterator`` saves with its state (and ``Trainer(mixer=...)`` calls)."""

    def before_step(self, trainer, step: int) -> dict[str, float] | None: ...

    def state(self) -> Any: ...

    def load_state(self, state: Any) -> None: ...


@functools.cache
def _register_with_grain() -> None:
    """Make ``MixtureIterator`` a (virtual) ``grain.DatasetIterator``: ``grain.checkpoint`` then
    saves its ``get_state()`` dict as JSON and hands it back to ``set_state``."""
    import grain
    grain.DatasetIterator.register(MixtureIterator)


class MixtureIterator:
    """Checkpointable iterator of this process's slice of every global batch of a ``Mixture``.

    ``read_row(domain_name, start) -> {field: array}`` builds one row; ``domain`` (the index into
    the mixture's domains) is added per row. With ``threads > 0`` rows of the next
    ``prefetch_batches`` batches are read by a thread pool; planning stays on the calling thread.
    It implements grain's ``DatasetIterator`` interface (``get_state``/``set_state`` of a JSON-ready
    dict, ``start_prefetch``, ``close``) and is registered as one on construction.
    """

    def __init__(self, mixture: Mixture, read_row: Callable[[str, int], dict[str, np.ndarray]],
                 global_batch: int, process_index: int = 0, process_count: int = 1,
                 threads: int = 0, prefetch_batches: int = 2):
        _register_with_grain()
        if global_batch <= 0 or global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        b = global_batch // process_count
        self.mixture, self.global_batch = mixture, global_batch
        self._read_row = read_row
        self._local = slice(process_index * b, (process_index + 1) * b)
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="moejax-mixture")
                      if threads > 0 else None)
        self._depth = prefetch_batches if self._pool is not None else 1
        self._planned: collections.deque = collections.deque()  # (rows or futures, cursor after)
        self._emitted = mixture.cursor()  # the cursor after the last batch handed out
        self.mixer: Mixer | None = None  # its state() is saved inside this iterator's state
        self._closed = False

    @property
    def weights(self) -> dict[str, float]:
        """The weights of the next batch handed out, by domain name."""
        return self.mixture.weights

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Weights from the next batch handed out on (ValueError naming a bad domain)."""
        check_weights(weights, self.mixture.streams)  # fail before touching anything
        self._drop_planned()
        self.mixture.set_weights(weights)

    def _plan(self) -> None:
        """Plan batches until ``_depth`` are queued (reads submitted to the pool, if any)."""
        while len(self._planned) < self._depth:
            domains, positions = self.mixture.take(self.global_batch)
            domains, positions = domains[self._local], positions[self._local]
            jobs = [(self.mixture.names[d], s, d)
                    for d, s in zip(domains, self.mixture.starts(domains, positions))]
            if self._pool is not None:
                jobs = [self._pool.submit(self._row, *job) for job in jobs]
            self._planned.append((jobs, self.mixture.cursor()))

    def _row(self, name: str, start: int, d: int) -> dict[str, np.ndarray]:
        row = self._read_row(name, start)
        row["domain"] = np.int32(d)
        return row

    def _drop_planned(self) -> None:
        """Forget planned batches and rewind the planner to what was handed out."""
        for jobs, _ in self._planned:
            for job in jobs:
                if hasattr(job, "cancel"):
                    job.cancel()
        self._planned.clear()
        self.mixture.seek(self._emitted)

    def __iter__(self) -> "MixtureIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError(f"{self} is closed")
        self._plan()
        jobs, after = self._planned.popleft()
        rows = [job.result() if self._pool is not None else self._row(*job) for job in jobs]
        self._emitted = after
        if self._pool is not None:
            self._plan()  # keep the pool busy while the caller trains on this batch
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def start_prefetch(self) -> None:
        if self._pool is not None:
            self._plan()

    def get_state(self) -> dict[str, Any]:
        state = {"mixture": self.mixture.state(self._emitted)}
        if self.mixer is not None:
            state["mixer"] = self.mixer.state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if "mixture" not in state:
            raise IteratorStateError(f"data-iterator state {sorted(state)} was not written by the domain "
                             "mixture (an older moejax's training stream?): it cannot resume "
                             "this stream; use a new workdir")
        self._drop_planned()
        self.mixture.load_state(state["mixture"])
        self._emitted = self.mixture.cursor()
        if self.mixer is not None:
            if "mixer" in state:
                self.mixer.load_state(state["mixer"])
            else:
                log.warning("the restored data state holds no mixer state: %s starts afresh",
                            type(self.mixer).__name__)

    def close(self) -> None:
        """Stop the reader threads (idempotent); ``next`` then raises."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._closed = True

    def __str__(self) -> str:
        return f"MixtureIterator(domains={self.mixture.names}, global_batch={self.global_batch})"
