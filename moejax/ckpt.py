"""Orbax checkpoints of a whole run: train state, data-iterator state and metadata, together.

One ``CheckpointManager`` per workdir (``workdir/ckpt``): async saves, keep-N, and restore into
*abstract sharded targets*, so a checkpoint written on one mesh restores onto another (Orbax
reshards on read). The step number is the host step (batches consumed).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from moejax.train import TrainState


def _state_dict(state: TrainState | Any) -> dict:
    return {"step": state.step, "params": state.params, "rest": state.rest,
            "opt_state": state.opt_state, "rng": state.rng}


class Checkpointer:
    """Save/restore ``{state, data, meta}`` under ``directory`` with Orbax."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator, meta: dict, *,
             force: bool = False) -> bool:
        """Start a (possibly async) save; returns whether one was started."""
        # An empty `rest` State (dense model) is saved as None; Orbax rejects empty subtrees.
        tree = _state_dict(state)
        if not jax.tree.leaves(tree["rest"]):
            tree["rest"] = None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: TrainState, data_iterator) -> tuple[TrainState, dict]:
        """Restore into ``abstract_state`` (ShapeDtypeStructs with the *current* shardings) and
        rewind ``data_iterator`` in place. Returns the state and the saved metadata."""
        target = _state_dict(abstract_state)
        empty_rest = not jax.tree.leaves(target["rest"])
        if empty_rest:
            target["rest"] = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # name the path and what was expected
            raise RuntimeError(
                f"could not restore checkpoint step {step} from {self.directory}: expected a train "
                f"state matching the current model config ({type(e).__name__}: {e})") from e
        tree = restored["state"]
        rest = abstract_state.rest if empty_rest else tree["rest"]
        state = TrainState(step=tree["step"], params=tree["params"], rest=rest,
                           opt_state=tree["opt_state"], rng=tree["rng"])
        return state, dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()



def latest_params(workdir: str, abstract_state: TrainState):
    """The parameters of the latest train checkpoint in ``workdir/ckpt``, restored onto
    ``abstract_state``'s shardings (the run's ``Setup.abstract_state``)."""
    ckpt_dir = os.path.join(os.path.abspath(workdir), "ckpt")
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "meta"))
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to take the parameters from")
        target = _state_dict(abstract_state)
        if not jax.tree.leaves(target["rest"]):
            target["rest"] = None
        tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return tree["state"]["params"]
    finally:
        manager.close()
