"""Orbax checkpoints of a whole run: train state, data-iterator state and metadata, together
(and, for runs that have them, extra arrays such as an RL run's frozen reference model).

One ``CheckpointManager`` per workdir (``workdir/ckpt``, local or ``gs://``): async saves, keep-N,
and restore into *abstract sharded targets*, so a checkpoint written on one mesh restores onto
another (Orbax reshards on read). The step number is the host step (batches consumed).

``restore_latest`` survives a damaged checkpoint (a job killed while writing, a bad disk): a step
whose saved shapes match the model but whose files do not read back is moved aside to
``ckpt/damaged-<step>`` (Orbax no longer lists it) with a warning, and the next older step is
restored. A checkpoint whose saved shapes differ from the model is a config mismatch and raises
``CheckpointMismatchError`` without touching anything.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moejax.data.mixture import IteratorStateError
from moejax.paths import as_path
from moejax.train import TrainState

ITEMS = ("state", "data", "meta", "extra")

# Orbax saves a replicated array "replica-parallel": each replica writes a slice of it, cut on its
# device by a slice program compiled per (array shape, device) at the first save. Below this many
# bytes per replica the cut costs more than the parallel write saves (biases, norms, small
# matrices; 64 compiled slices per save of a tiny model on 8 CPU devices, measured), so those
# arrays are written whole by one replica. Larger replicated arrays stay replica-parallel. Orbax's
# StandardCheckpointHandler takes no handler registry of its own, so this sets the process-wide one.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
    """The override is the point: Orbax's "overriding jax.Array" warning is kept off users'
    consoles (it printed once in every process that imported this module)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


class CheckpointMismatchError(ValueError):
    """The checkpoint holds a train state of another shape than the current model config."""


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step whose files do not read back."""


def _state_dict(state: TrainState | Any) -> dict:
    """The saved tree; an empty ``rest`` (dense model) is None (Orbax rejects empty subtrees)."""
    tree = {"step": state.step, "params": state.params, "rest": state.rest,
            "opt_state": state.opt_state, "rng": state.rng}
    if not jax.tree.leaves(tree["rest"]):
        tree["rest"] = None
    return tree


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of a tree's leaves, paths as plain strings (dict keys, attributes and
    indices alike, so Orbax's metadata tree and the nnx target compare)."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _cause_of_type(e: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``e``'s cause/context chain (Orbax wraps errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _all_processes_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (all must restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """Save/restore ``{state, data, meta}`` under ``directory`` with Orbax."""

    def __init__(self, directory: str | epath.Path, *, keep: int = 2, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator, meta: dict, *,
             force: bool = False, extra=None) -> bool:
        """Start a (possibly async) save; returns whether one was started. ``data_iterator``
        may be None (a run whose data order lives in ``meta``); ``extra`` is an optional pytree
        of arrays saved with the same step."""
        items = {"state": ocp.args.StandardSave(_state_dict(state)),
                 "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if extra is not None:
            items["extra"] = ocp.args.StandardSave(extra)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def check_matches(self, step: int, abstract_state: TrainState) -> None:
        """Raise CheckpointMismatchError when ``step``'s saved leaves differ in path or shape from
        ``abstract_state``; CheckpointDamagedError when its metadata does not read back."""
        try:
            saved = _shapes(ocp.StandardCheckpointHandler().metadata(
                self.directory / str(step) / "state"))
        except Exception as e:  # noqa: BLE001 -- any failure to read metadata is damage
            raise CheckpointDamagedError(
                f"its metadata does not read back ({_first_line(e)})") from e
        want = _shapes(_state_dict(abstract_state))
        if saved == want:
            return
        diff = sorted(set(saved) ^ set(want)) + sorted(
            k for k in set(saved) & set(want) if saved[k] != want[k])
        shown = ", ".join(f"{'/'.join(k)}: saved {saved.get(k)} vs model {want.get(k)}"
                          for k in diff[:4])
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} holds a train state of another shape "
            f"than the current model config ({len(diff)} leaves differ: {shown}); restore the "
            f"config it was written with or use a new --workdir")

    def restore(self, step: int, abstract_state: TrainState, data_iterator, *,
                abstract_extra=None) -> tuple[TrainState, dict]:
        """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with the *current*
        shardings) and rewind ``data_iterator`` in place (None: the run saved none). Returns the
        state and the saved metadata; with ``abstract_extra`` (the target of the ``extra`` saved
        with the step) the metadata's ``"extra"`` holds that restored tree.
        Raises CheckpointMismatchError (other shapes) or CheckpointDamagedError (unreadable)."""
        self.check_matches(step, abstract_state)
        target = _state_dict(abstract_state)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if abstract_extra is not None:
            items["extra"] = ocp.args.StandardRestore(abstract_extra)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- shapes matched: the files are at fault ...
            incompatible = _cause_of_type(e, IteratorStateError)
            if incompatible is not None:  # ... unless the data stream refused its saved state
                raise CheckpointMismatchError(f"step {step}: {incompatible}") from e
            raise CheckpointDamagedError(f"its files do not read back ({_first_line(e)})") from e
        tree = restored["state"]
        rest = abstract_state.rest if target["rest"] is None else tree["rest"]
        state = TrainState(step=tree["step"], params=tree["params"], rest=rest,
                           opt_state=tree["opt_state"], rng=tree["rng"])
        meta = dict(restored["meta"])
        if abstract_extra is not None:
            meta["extra"] = restored["extra"]
        return state, meta

    def restore_latest(self, abstract_state: TrainState, data_iterator, *,
                       abstract_extra=None) -> tuple[TrainState, dict] | None:
        """Restore the newest step that reads back on every process; damaged newer steps are set
        aside with a warning. None when no step is left (the run starts afresh)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out, why = self.restore(step, abstract_state, data_iterator,
                                        abstract_extra=abstract_extra), None
            except CheckpointDamagedError as e:
                out, why = None, str(e)
            if _all_processes_ok(out is not None):
                return out
            self._set_aside(step, why or "another process could not read it")
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Move a damaged step to ``damaged-<step>`` beside the steps (kept for inspection, no
        longer a step to Orbax) and warn naming it."""
        target = self.directory / f"damaged-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"damaged-{step}-{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"moejax-set-aside-{step}")
        self.manager.reload()
        warnings.warn(f"checkpoint step {step} in {self.directory} is damaged: {why}; moved it to "
                      f"{target} and restoring the next older step", RuntimeWarning, stacklevel=2)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_params(workdir: str | epath.Path, abstract_state: TrainState):
    """The parameters of the latest train checkpoint in ``workdir/ckpt``, restored onto
    ``abstract_state``'s shardings (the run's ``Setup.abstract_state``)."""
    ckpt_dir = as_path(workdir) / "ckpt"
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to take the parameters from")
        target = _state_dict(abstract_state)
        tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return tree["state"]["params"]
    finally:
        manager.close()
