"""What an RL run reads besides its checkpoint: the tokenizer, the task file's training / held-out
split (or the synthetic tasks) and the evaluation sets per tier."""

from __future__ import annotations

from moejax.config import ConfigError
from moejax.rl import tasks
from moejax.rl.config import RLRunConfig


def rl_tokenizer(cfg: RLRunConfig):
    """The run's tokenizer: bytes, a local tokenizer.json, or the BPE trained on the corpus."""
    from moejax.data.tokenizer import BPETokenizer, ByteTokenizer

    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.data.tokenizer == "bpe":
        from moejax.data import prepare_data
        return prepare_data(cfg.data, vocab_size=cfg.model.vocab_size).tokenizer
    return BPETokenizer.from_file(cfg.data.tokenizer)


def load_file_items(cfg: RLRunConfig):
    """(train, eval) items of ``rl.task_file``, or None for the synthetic tasks."""
    if not cfg.rl.task_file:
        return None
    try:
        items = tasks.load_task_file(cfg.rl.task_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"rl.task_file: {e}") from e
    train, held_out = tasks.split_file_items(items, cfg.rl.tasks.eval_fraction)
    if not train or not held_out:
        raise ConfigError(f"rl.task_file: {cfg.rl.task_file} splits into {len(train)} training and "
                          f"{len(held_out)} held-out rows (rl.tasks.eval_fraction="
                          f"{cfg.rl.tasks.eval_fraction}); both must be non-empty")
    return train, held_out


def eval_sets(cfg: RLRunConfig, file_items) -> dict[str, list]:
    """Held-out items per tier: every training tier and the OOD tiers (or the task file's)."""
    n = cfg.rl.eval_items_per_tier
    if file_items is not None:
        held_out = list(file_items[1][:n])
        return {held_out[0].tier: held_out}
    return tasks.eval_sets(cfg.rl.tasks, n)
