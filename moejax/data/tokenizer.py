"""Tokenizers: byte-level (default), byte-level BPE trained locally, or any tokenizer.json on disk.

All share one small protocol and the convention that ids 0/1/2 are pad/bos/eos for the built-in
ones; a loaded tokenizer.json declares its own special ids, which are looked up by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in the byte and trained BPE tokenizers
# Names tried, in order, when reading the special ids of a foreign tokenizer.json.
_SPECIAL_NAMES = {
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "[SEP]"),
}


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the samplers need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: pad=0, bos=1, eos=2, byte b -> b+3; vocab 259; lossless for any string."""

    vocab_size, pad_id, bos_id, eos_id = 259, 0, 1, 2
    OFFSET = 3

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
        ids = ids[ids >= self.OFFSET] - self.OFFSET
        return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (usually byte-level BPE) behind the ``Tokenizer`` protocol."""

    def __init__(self, tok, path: str | os.PathLike | None = None):
        self._tok = tok
        self.path = str(path) if path is not None else None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, names in _SPECIAL_NAMES.items():
            ids[role] = next((i for n in names if (i := tok.token_to_id(n)) is not None), None)
        missing = [r for r, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"tokenizer {self.path or '<in memory>'} lacks special token(s) {missing}; expected "
                f"one of {[_SPECIAL_NAMES[r] for r in missing]} in its vocabulary or added tokens")
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Load any tokenizer.json from a local path; never downloads."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise FileNotFoundError(f"data.tokenizer={str(path)!r}: expected a tokenizer.json file "
                                    f"at {p}, or 'byte' / 'bpe'")
        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust error says what is malformed
            raise ValueError(f"data.tokenizer: {p} is not a valid tokenizer.json: {e}") from e
        return cls(tok, p)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Byte-level BPE trained locally; ids 0/1/2 are <pad>/<bos>/<eos>, then the 256 bytes."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
        tok.train_from_iterator(texts, trainer)
        out = cls(tok)
        assert (out.pad_id, out.bos_id, out.eos_id) == (0, 1, 2), "specials must come first"
        return out

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))
        self.path = str(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(cfg, train_texts: Iterable[str] | None = None,
                   trained_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names ("byte", "bpe" or a tokenizer.json path).

    For "bpe", ``trained_path`` (a cached tokenizer.json) is loaded when it exists; otherwise the
    tokenizer is trained on ``train_texts`` (the training split) and saved there.
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        if trained_path is not None and Path(trained_path).is_file():
            return BPETokenizer.from_file(trained_path)
        if train_texts is None:
            raise ValueError("data.tokenizer='bpe' needs the training texts (or a trained "
                             "tokenizer.json) to train on; use moejax.data.prepare_data")
        tok = BPETokenizer.train(train_texts, cfg.bpe_vocab_size)
        if trained_path is not None:
            tok.save(trained_path)
        return tok
    return BPETokenizer.from_file(cfg.tokenizer)
