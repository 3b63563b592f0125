"""The SFT warm start of an RL run: the pretraining ``Trainer`` on task demonstrations.

``DemoData`` gives the Trainer the interface of the corpus pipeline (``domains``,
``train_iterator``, ``eval_batches``): training row ``i`` is the demonstration (prompt, solver
trace, answer, eos) of training item ``i`` (``moejax.rl.tasks.train_item``: a pure function of the
seed and ``i``, so grain's iterator state resumes it exactly), with the loss on the completion
tokens only; the validation rows are held-out items of every training tier. A task file cycles
through its training split in a seeded order per pass.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from moejax.config import ConfigError
from moejax.rl import encode, tasks
from moejax.rl.config import RLConfig, RLRunConfig
from moejax.trainer import Trainer

DOMAIN = "demo"
_MAX_ROWS = 1 << 50


def sft_width(cfg: RLRunConfig) -> int:
    """Row width (tokens per row + 1) of SFT: the rollout's prompt + new tokens."""
    return cfg.rl.rollout.max_prompt_len + cfg.rl.rollout.max_new_tokens


def sft_config(cfg: RLRunConfig) -> RLRunConfig:
    """The run config of the SFT stage: ``rl.sft`` sets steps, batch, lr and warmup; rows are
    ``sft_width - 1`` tokens; the rest (model, mesh, optimizer moments, cadences) is the RL run's."""
    s = cfg.rl.sft
    train = dataclasses.replace(cfg.train, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                warmup_steps=min(s.warmup_steps, max(s.steps - 1, 0)),
                                eval_every=min(cfg.train.eval_every, max(s.steps, 1)),
                                ckpt_every=min(cfg.train.ckpt_every, max(s.steps, 1)))
    data = dataclasses.replace(cfg.data, seq_len=sft_width(cfg) - 1)
    # only what SFT reads; the RL-only fields at their defaults, so arms that differ in RL
    # settings share one SFT stage (its resume check compares the whole config)
    rl = RLConfig(tasks=cfg.rl.tasks, task_file=cfg.rl.task_file, rollout=cfg.rl.rollout,
                  sft=cfg.rl.sft, chat_template=cfg.rl.chat_template)
    return dataclasses.replace(cfg, train=train, data=data, rl=rl)


def demo_row(item: tasks.TaskItem, tokenizer, width: int, *, scratchpad: bool,
             chat_template) -> dict[str, np.ndarray]:
    """One training row of ``width - 1`` positions from a demonstration: inputs/targets (shifted
    by one), segment_ids (1 on the tokens, 0 on padding), positions, loss_mask (targets that are
    completion tokens, eos included) and domain 0."""
    demo = encode.encode_demonstrations([item], tokenizer, scratchpad=scratchpad,
                                        chat_template=chat_template)
    n = int(demo.lengths[0])
    if n > width:
        raise ConfigError(
            f"rl.rollout.max_new_tokens: the demonstration of task {item.tier} needs {n} tokens "
            f"(prompt + completion + eos) but rollout.max_prompt_len + max_new_tokens = {width}; "
            "raise max_new_tokens (or max_prompt_len)")
    tokens = np.full(width, tokenizer.pad_id, np.int32)
    tokens[:n] = demo.tokens[0, :n]
    completion = np.zeros(width, bool)
    completion[:n] = demo.completion_mask[0, :n]
    t = np.arange(width - 1)
    return {"inputs": tokens[:-1], "targets": tokens[1:],
            "segment_ids": (t < n).astype(np.int32), "positions": t.astype(np.int32),
            "loss_mask": completion[1:].astype(np.float32), "domain": np.int32(0)}


class DemoData:
    """Task demonstrations behind the corpus pipeline's interface (see the module docstring)."""

    def __init__(self, cfg: RLRunConfig, tokenizer, file_items=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.width = sft_width(cfg)
        self.chat = None if cfg.rl.chat_template == "none" else "auto"
        self.file_items = file_items  # (train, eval) lists of a task file, or None

    @property
    def domains(self) -> tuple[str, ...]:
        return (DOMAIN,)

    def _item(self, i: int) -> tasks.TaskItem:
        train = None if self.file_items is None else self.file_items[0]
        return tasks.stream_item(self.cfg.rl.tasks, train, i)

    def row(self, i: int) -> dict[str, np.ndarray]:
        return demo_row(self._item(i), self.tokenizer, self.width,
                        scratchpad=self.cfg.rl.sft.scratchpad, chat_template=self.chat)

    def train_iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1):
        import grain

        b = global_batch // process_count

        def global_row(r: int) -> int:
            return (r // b) * global_batch + process_index * b + r % b

        ds = (grain.MapDataset.range(_MAX_ROWS).map(lambda r: self.row(global_row(r)))
              .batch(b, drop_remainder=True))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def _eval_items(self) -> list[tasks.TaskItem]:
        n = self.cfg.rl.sft.eval_items
        if self.file_items is not None:
            return list(self.file_items[1][:n])
        tiers = tasks.train_tiers(self.cfg.rl.tasks)
        per = -(-n // len(tiers))
        return [it for t in tiers for it in tasks.eval_items(self.cfg.rl.tasks, t, per)][:n]

    def eval_batches(self, domain: str, num_batches: int, global_batch: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict]:
        """Held-out demonstrations in at most ``num_batches`` batches (the last padded with rows
        that carry no loss)."""
        items = self._eval_items()
        rows = [demo_row(it, self.tokenizer, self.width, scratchpad=self.cfg.rl.sft.scratchpad,
                         chat_template=self.chat) for it in items]
        pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
        b = global_batch // process_count
        out = []
        for k in range(min(num_batches, -(-len(rows) // global_batch))):
            lo = k * global_batch + process_index * b
            chunk = [rows[j] if j < len(rows) else pad for j in range(lo, lo + b)]
            out.append({key: np.stack([r[key] for r in chunk]) for key in rows[0]})
        return out


def run_sft(cfg: RLRunConfig, workdir: str | os.PathLike, tokenizer, *, file_items=None,
            init_state_fn=None, progress: bool = True) -> dict:
    """Train (or resume, or reuse when finished) the SFT stage in ``workdir``; its latest
    checkpoint is the RL start. Returns the Trainer's summary."""
    sft = sft_config(cfg)
    trainer = Trainer(sft, workdir, data=DemoData(sft, tokenizer, file_items),
                      init_state_fn=init_state_fn, progress=progress)
    return trainer.run()
