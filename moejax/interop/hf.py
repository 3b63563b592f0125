"""Hugging Face checkpoints in and out (Qwen3 / Qwen3-MoE / Qwen3-Next blocks), with nothing silent.

Import reads a local model directory (config.json + safetensors, sharded index too) into a moejax
``Config`` and parameters created directly on a mesh: every parameter is built with
``jax.make_array_from_callback``, so each device reads only the layers / experts of its own shard
and the whole model never sits on one device or in one host buffer. Every checkpoint tensor is
consumed or reported: a missing, unexpected or mis-shaped tensor raises ``CheckpointError`` naming
it (only prefixes passed as ``ignore`` and known buffers such as ``rotary_emb.inv_freq`` are
skipped, and those are listed in the report). Export writes config.json + safetensors (sharded
above ``max_shard_bytes``) that transformers loads.

CLI::

    python -m moejax.interop.hf import DIR --out WORKDIR [--mesh expert=4,data=2] [--param-dtype float32]
    python -m moejax.interop.hf export WORKDIR --out DIR

``import`` checks the whole checkpoint and makes WORKDIR: ``config.json`` (the moejax Config, with
``data.tokenizer`` at ``hf/tokenizer.json`` when the source has one), ``import_report.json`` and
``hf/`` (the safetensors, hard-linked when possible, plus tokenizer / generation files). A run
starting from WORKDIR builds its parameters from ``hf/`` onto its own mesh and dtype
(``load_workdir_params``): the weights are never converted into a second on-disk copy, and peak host
memory stays near one copy of the model. Export takes an imported WORKDIR or a training run's
workdir (latest checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from moejax import ckpt
from moejax.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig
from moejax.interop import qwen3, qwen3_next  # qwen3_next: hybrid/MTP, else qwen3
from moejax.interop.safetensors_dir import CheckpointError, SafetensorsDir, write_safetensors_dir
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model

# files copied verbatim from the source directory into WORKDIR/hf and back out on export
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model dir)")
    with open(path) as f:
        return json.load(f)


def abstract_params(model_cfg: ModelConfig, mesh, mesh_cfg: MeshConfig) -> dict:
    """The model's parameters as a pure dict of ShapeDtypeStructs carrying their NamedShardings."""
    with use_mesh(mesh, rules_for(mesh_cfg)):
        model = nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(0)))
        _, params, _ = nnx.split(model, nnx.Param, ...)
        shardings = nnx.get_named_sharding(params, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(params), nnx.to_pure_dict(shardings))


def mesh_for(mesh_cfg: MeshConfig):
    """A mesh of ``mesh_cfg``; fixed axis sizes using fewer devices than exist take the first ones
    (e.g. ``data=1``: import onto one device)."""
    sizes = [s for s in mesh_cfg.sizes if s != -1]
    n = int(np.prod(sizes))
    fixed = len(sizes) == len(mesh_cfg.sizes)
    return make_mesh(mesh_cfg, jax.devices()[:n] if fixed and n < jax.device_count() else None)


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def check_tensors(reader: SafetensorsDir, leaves: Sequence[qwen3.Leaf], hf: dict,
                  ignore: Sequence[str]) -> list[str]:
    """Raise on a missing / mis-shaped / unexpected tensor; return the ignored names."""
    expected: dict[str, tuple] = {}
    for leaf in leaves:
        for name in leaf.names.reshape(-1):
            expected[name] = leaf.hf_shape()
    present = set(reader.names)
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.directory}: tensor {missing[0]!r}{more} is missing; "
                              f"config.json ({hf.get('model_type')}) needs it")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(reader.shape(name))}, expected "
                                  f"{list(shape)} from config.json")
    ignored, extra = [], []
    for name in sorted(present - set(expected)):
        if name.endswith(qwen3.BUFFER_SUFFIXES) or any(name.startswith(p) for p in ignore):
            ignored.append(name)
        elif name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue  # checked against the embedding below
        else:
            extra.append(name)
    if extra:
        more = f" (and {len(extra) - 1} more: {extra[1:4]}...)" if len(extra) > 1 else ""
        raise CheckpointError(f"{reader.directory}: unexpected tensor {extra[0]!r}{more} that the "
                              f"{hf.get('model_type')} config does not use; pass ignore=[prefix] "
                              "(CLI --ignore) to drop it knowingly")
    return ignored


def _leaf_array(reader: SafetensorsDir, leaf: qwen3.Leaf, sds, sharding, dtype) -> jax.Array:
    """Build one parameter shard by shard; a shard reads only its slice of the stacked dims."""
    n_stack = leaf.names.ndim
    cache: dict = {}

    def callback(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(sds.shape) - len(index))
        stack_idx, rest = index[:n_stack], index[n_stack:]
        names = np.asarray(leaf.names[stack_idx], dtype=object)
        missing = [n for n in names.reshape(-1) if n not in cache]
        # one read per shard: each file is opened once for all of this shard's tensors
        for n, t in reader.iter_tensors(missing):
            cache[n] = leaf.to_param(t).astype(dtype, copy=False)
        flat = [cache[n][rest] for n in names.reshape(-1)]
        return np.stack(flat).reshape(names.shape + flat[0].shape) if n_stack else flat[0]

    arr = jax.make_array_from_callback(sds.shape, sharding, callback)
    cache.clear()
    return arr


def inspect_hf(directory: str, *, dtype: str = "float32", param_dtype: str = "auto",
               scan_layers: bool = False, ignore: Sequence[str] = ()):
    """Check a HF model dir without loading it: ``(ModelConfig, reader, ignored tensor names)``.
    Raises on an unsupported config option or a missing / unexpected / mis-shaped tensor."""
    hf = read_hf_config(directory)
    reader = SafetensorsDir(directory)
    if param_dtype == "auto":
        param_dtype = np.dtype(reader.dtype("model.embed_tokens.weight")).name \
            if "model.embed_tokens.weight" in reader.names else "float32"
    model_cfg = qwen3_next.config_from_hf(hf, dtype=dtype, param_dtype=param_dtype,
                                          scan_layers=scan_layers)
    ignored = check_tensors(reader, qwen3_next.plan(model_cfg), hf, ignore)
    check_tied_head(reader, hf)
    return model_cfg, reader, ignored


def check_tied_head(reader: SafetensorsDir, hf: dict) -> None:
    """A tied model may still store ``lm_head.weight``: it must equal the embedding (consumed)."""
    if hf.get("tie_word_embeddings") and "lm_head.weight" in reader.names:
        t = reader.read(["lm_head.weight", "model.embed_tokens.weight"])
        if not np.array_equal(t["lm_head.weight"], t["model.embed_tokens.weight"]):
            raise CheckpointError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
                                  "but config.json says tie_word_embeddings=true")


def build_params(reader: SafetensorsDir, model_cfg: ModelConfig, target: dict,
                 ignored: Sequence[str] = ()) -> dict:
    """The parameters of ``model_cfg`` from ``reader`` as a pure dict of jax.Arrays with the
    shapes, dtypes and shardings of ``target`` (a pure dict of ShapeDtypeStructs with sharding)."""
    params: dict = jax.tree.map(lambda x: None, target)
    for leaf in qwen3_next.plan(model_cfg):
        sds = _get(target, leaf.path)
        if tuple(sds.shape[leaf.names.ndim:]) != leaf.shape:
            raise CheckpointError(f"parameter {'.'.join(map(str, leaf.path))} has shape "
                                  f"{sds.shape}, but tensors {leaf.names.reshape(-1)[0]!r}... "
                                  f"give {leaf.names.shape + leaf.shape}")
        _set(params, leaf.path, _leaf_array(reader, leaf, sds, sds.sharding, np.dtype(sds.dtype)))
    unread = sorted(set(reader.names) - reader.consumed - set(ignored))
    if unread:  # every expected tensor is read by some shard; anything else is a bug here
        raise CheckpointError(f"tensor {unread[0]!r} was never read ({len(unread)} unread)")
    return params


def import_hf(directory: str, *, mesh=None, mesh_cfg: MeshConfig | None = None,
              dtype: str = "float32", param_dtype: str = "auto", scan_layers: bool = False,
              ignore: Sequence[str] = ()) -> tuple[ModelConfig, dict, dict]:
    """Read a HF model dir into ``(ModelConfig, params pure dict of sharded jax.Arrays, report)``.

    ``param_dtype='auto'`` keeps the checkpoint's dtype (so host memory stays ~ the checkpoint's
    size); ``dtype`` is the compute dtype. The mesh defaults to all devices on the data axis."""
    model_cfg, reader, ignored = inspect_hf(directory, dtype=dtype, param_dtype=param_dtype,
                                            scan_layers=scan_layers, ignore=ignore)
    mesh_cfg = mesh_cfg or MeshConfig()
    mesh = mesh if mesh is not None else mesh_for(mesh_cfg)
    model_cfg.check_mesh_divisibility(dict(mesh.shape))
    target = abstract_params(model_cfg, mesh, mesh_cfg)
    params = build_params(reader, model_cfg, target, ignored)
    report = {"source": os.path.abspath(directory), "family": read_hf_config(directory)["model_type"],
              "tensors": len(reader.names), "consumed": len(reader.consumed),
              "ignored": ignored, "ignore_prefixes": list(ignore), "param_dtype": model_cfg.param_dtype}
    return model_cfg, params, report


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)  # same filesystem: no second copy of the weights on disk
    except OSError:
        shutil.copyfile(src, dst)


def data_config_for(model_cfg: ModelConfig) -> DataConfig:
    """The default data config with ``seq_len`` capped at the model's context, so an imported
    short-context model (e.g. ``max_position_embeddings=64``) gets a WORKDIR config that validates."""
    return DataConfig(seq_len=min(DataConfig().seq_len, model_cfg.max_seq_len))


def import_to_workdir(directory: str, workdir: str, *, mesh_cfg: MeshConfig | None = None,
                      dtype: str = "float32", param_dtype: str = "auto", scan_layers: bool = False,
                      ignore: Sequence[str] = ()) -> Config:
    """Check ``directory`` completely (config, every tensor's name and shape), then make WORKDIR:
    ``hf/`` (the safetensors, hard-linked when possible, and the side files), the moejax
    ``config.json`` and ``import_report.json``. Parameters are built from ``hf/`` when a run
    loads them (``load_workdir_params``), directly on that run's mesh and in its dtype, so the
    weights are never held twice in host memory and never stored in a second format."""
    model_cfg, reader, ignored = inspect_hf(directory, dtype=dtype, param_dtype=param_dtype,
                                            scan_layers=scan_layers, ignore=ignore)
    mesh_cfg = mesh_cfg or MeshConfig()
    model_cfg.check_mesh_divisibility(dict(mesh_for(mesh_cfg).shape))
    abstract = abstract_params(model_cfg, mesh_for(MeshConfig(data=1)), MeshConfig(data=1))
    for leaf in qwen3_next.plan(model_cfg):  # plan and model agree (before any file is written)
        if tuple(_get(abstract, leaf.path).shape[leaf.names.ndim:]) != leaf.shape:
            raise AssertionError(f"plan/model mismatch at {leaf.path}")
    side = os.path.join(workdir, "hf")
    if jax.process_index() == 0:
        os.makedirs(side, exist_ok=True)
        files = sorted(set(reader.file_of.values()))
        index = os.path.join(directory, "model.safetensors.index.json")
        for fn in files + (["model.safetensors.index.json"] if os.path.exists(index) else []):
            _link_or_copy(os.path.join(directory, fn), os.path.join(side, fn))
        for fn in SIDE_FILES + ("config.json",):
            if os.path.exists(os.path.join(directory, fn)):
                shutil.copy(os.path.join(directory, fn), os.path.join(side, fn))
    data = data_config_for(model_cfg)
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        data = dataclasses.replace(data, tokenizer=os.path.abspath(os.path.join(side, "tokenizer.json")))
    elif model_cfg.vocab_size < 259:
        raise ConfigError(f"{directory} has no tokenizer.json and vocab_size={model_cfg.vocab_size} "
                          "is too small for moejax's byte tokenizer (259): add the model's "
                          "tokenizer.json to the directory")
    cfg = Config(model=model_cfg, mesh=mesh_cfg, data=data)
    report = {"source": os.path.abspath(directory), "family": read_hf_config(directory)["model_type"],
              "tensors": len(reader.names), "ignored": ignored, "ignore_prefixes": list(ignore),
              "param_dtype": model_cfg.param_dtype, "params": model_cfg.num_params()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json())
        with open(os.path.join(workdir, REPORT), "w") as f:
            json.dump(report, f, indent=2)
    return cfg


REPORT = "import_report.json"


def is_imported(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, REPORT))


def load_workdir_params(workdir: str, model_cfg: ModelConfig, target: dict,
                        abstract_state=None) -> dict:
    """Parameters for ``model_cfg`` onto ``target`` (pure dict of ShapeDtypeStructs with
    shardings): built from an imported WORKDIR's ``hf/`` (re-checked), or taken from a training
    run's latest checkpoint (which needs the run's ``abstract_state``)."""
    if is_imported(workdir):
        with open(os.path.join(workdir, REPORT)) as f:
            prefixes = json.load(f).get("ignore_prefixes", [])
        side = os.path.join(workdir, "hf")
        reader, hf = SafetensorsDir(side), read_hf_config(side)
        ignored = check_tensors(reader, qwen3_next.plan(model_cfg), hf, prefixes)
        check_tied_head(reader, hf)
        return build_params(reader, model_cfg, target, ignored)
    if abstract_state is None:
        raise ValueError(f"{workdir} is not an imported WORKDIR; reading a run's checkpoint needs "
                         "its abstract train state")
    return nnx.to_pure_dict(ckpt.latest_params(workdir, abstract_state))


def export_hf(model_cfg: ModelConfig, params: dict, out_dir: str, *,
              max_shard_bytes: int = 2 << 30, side_dir: str | None = None) -> list[str]:
    """Write ``params`` (pure dict of jax/numpy arrays) as a HF model dir; returns the files."""
    qwen3_next.check_exportable(model_cfg)  # fail before any file is written
    dtype = np.dtype(model_cfg.param_dtype)
    leaves = qwen3_next.plan(model_cfg)

    def tensors():
        for leaf in leaves:
            value = _get(params, leaf.path)
            for idx in np.ndindex(*leaf.names.shape):
                def produce(value=value, idx=idx, leaf=leaf):
                    a = np.asarray(jax.device_get(value[idx] if idx else value)).astype(dtype)
                    return leaf.to_hf(a)
                yield leaf.names[idx], leaf.hf_shape(), dtype, produce

    if jax.process_index() != 0:
        return []
    files = write_safetensors_dir(out_dir, tensors(), max_shard_bytes=max_shard_bytes)
    hf = qwen3_next.config_to_hf(model_cfg, torch_dtype=dtype.name)
    if side_dir and os.path.exists(os.path.join(side_dir, "config.json")):
        with open(os.path.join(side_dir, "config.json")) as f:
            src = json.load(f)
        # keep the source's token ids and similar fields that moejax does not model
        hf = {**{k: v for k, v in src.items() if k not in hf and not k.startswith("linear_")
                 and k != "transformers_version"}, **hf}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if side_dir:
        for fn in SIDE_FILES:
            if os.path.exists(os.path.join(side_dir, fn)):
                shutil.copy(os.path.join(side_dir, fn), os.path.join(out_dir, fn))
    return files


def export_workdir(workdir: str, out_dir: str, **kw) -> list[str]:
    """Export an imported WORKDIR or a training run's latest checkpoint."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = Config.from_dict(json.load(f))
    mesh_cfg = MeshConfig(data=1)  # export gathers every tensor to the host anyway
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh = mesh_for(mesh_cfg)
    target = abstract_params(cfg.model, mesh, mesh_cfg)
    abstract_state = None
    if not is_imported(workdir):
        from moejax import train
        abstract_state = train.setup(cfg, mesh).abstract_state
    params = load_workdir_params(workdir, cfg.model, target, abstract_state)
    side = os.path.join(workdir, "hf")
    files = export_hf(cfg.model, params, out_dir, side_dir=side if os.path.isdir(side) else None,
                      **kw)
    tok = cfg.data.tokenizer
    if tok.endswith(".json") and os.path.exists(tok) and \
            not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        shutil.copy(tok, os.path.join(out_dir, "tokenizer.json"))
    return files


def _parse_mesh(text: str) -> MeshConfig:
    sizes = dict(kv.split("=") for kv in text.split(",") if kv)
    return MeshConfig(**{k: int(v) for k, v in sizes.items()})


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moejax.interop.hf", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF model dir -> moejax WORKDIR")
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    imp.add_argument("--mesh", default="", help="axis sizes, e.g. expert=4,data=2 (default: data=all)")
    imp.add_argument("--dtype", default="float32", help="compute dtype")
    imp.add_argument("--param-dtype", default="auto", help="'auto' keeps the checkpoint's dtype")
    imp.add_argument("--scan-layers", action="store_true")
    imp.add_argument("--ignore", action="append", default=[],
                     help="tensor-name prefix to drop knowingly (e.g. mtp.); repeatable")
    exp = sub.add_parser("export", help="moejax WORKDIR -> HF model dir")
    exp.add_argument("workdir")
    exp.add_argument("--out", required=True)
    exp.add_argument("--max-shard-gb", type=float, default=2.0)
    args = ap.parse_args(argv)
    if args.cmd == "import":
        cfg = import_to_workdir(args.src, args.out, mesh_cfg=_parse_mesh(args.mesh),
                                dtype=args.dtype, param_dtype=args.param_dtype,
                                scan_layers=args.scan_layers, ignore=tuple(args.ignore))
        print(f"imported {args.src} -> {args.out} ({cfg.model.num_params():,} params)")
    else:
        files = export_workdir(args.workdir, args.out,
                               max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        print(f"exported {args.workdir} -> {args.out}: {', '.join(files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
