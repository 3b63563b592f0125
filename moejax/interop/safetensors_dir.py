"""Read and write a Hugging Face model directory's safetensors (single file or sharded with an index).

Reading is lazy and bounded: tensor names, shapes and dtypes come from the file headers; tensors are
read on demand through ``safetensors.safe_open`` (memory-mapped), and each file is closed again
after every read so mapped pages do not pile up in the process's resident memory. Every read is
recorded, so the importer can report tensors that nothing consumed.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model needs; the message names the tensor."""


class SafetensorsDir:
    """The tensors of ``directory``: ``names``, ``shape(name)``, ``dtype(name)``, ``read(names)``."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        index = os.path.join(self.directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(p for p in os.listdir(self.directory) if p.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory}: no {INDEX} and no *.safetensors files")
            weight_map = {}
            for fn in files:
                with safe_open(os.path.join(self.directory, fn), framework="np") as f:
                    weight_map.update({k: fn for k in f.keys()})
        self.file_of: dict[str, str] = dict(weight_map)
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        by_file = collections.defaultdict(list)
        for name, fn in self.file_of.items():
            by_file[fn].append(name)
        for fn, names in by_file.items():
            path = os.path.join(self.directory, fn)
            if not os.path.exists(path):
                raise CheckpointError(f"{index}: tensor {names[0]!r} lives in {fn}, which is missing")
            with safe_open(path, framework="np") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{INDEX} lists tensor {name!r} in {fn}, which lacks it")
                    s = f.get_slice(name)
                    self._meta[name] = (tuple(s.get_shape()), np.dtype(_DTYPES[s.get_dtype()]))
        self.consumed: set[str] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> np.dtype:
        return self._meta[name][1]

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, copy)`` for each name, one at a time (so a caller converting them holds one
        raw tensor at a time); each file is opened once per call and closed after its tensors."""
        by_file = collections.defaultdict(list)
        for n in names:
            by_file[self.file_of[n]].append(n)
        for fn, group in by_file.items():
            with safe_open(os.path.join(self.directory, fn), framework="np") as f:
                for n in group:
                    self.consumed.add(n)
                    yield n, np.array(f.get_tensor(n), copy=True)

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Copies of the named tensors."""
        return dict(self.iter_tensors(names))


def write_safetensors_dir(directory: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype,
                                                                   Callable[[], np.ndarray]]],
                          *, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write ``(name, shape, dtype, produce)`` tensors as ``model.safetensors`` or as
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (the layout
    transformers reads). Tensors are produced shard by shard, so at most one shard is in memory."""
    plan: list[list] = [[]]
    size = 0
    for name, shape, dtype, produce in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape, dtype, produce))
        size += nbytes
    os.makedirs(directory, exist_ok=True)
    n = len(plan)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fn, shard in zip(files, plan):
        arrays = {}
        for name, shape, dtype, produce in shard:
            a = np.ascontiguousarray(produce())
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {a.shape} {a.dtype}, planned {shape} {dtype}")
            arrays[name] = a
            weight_map[name] = fn
            total += a.nbytes
        save_file(arrays, os.path.join(directory, fn), metadata={"format": "pt"})
        del arrays
    if n > 1:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
