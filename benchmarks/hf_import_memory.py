"""Peak host memory of importing a ~1B-parameter HF checkpoint, relative to the checkpoint's size.

Writes a random Qwen3 checkpoint (bf16, sharded safetensors, the layout transformers writes) and
imports it in fresh subprocesses, each measured by its peak resident set (``ru_maxrss``, which
counts memory-mapped file pages too):

  baseline   python + jax + moejax.interop.hf imported, backend initialised (the floor)
  import     ``import_hf``: every parameter built on one CPU device (in the checkpoint's dtype)
  cli        ``python -m moejax.interop.hf import``: full check + WORKDIR (weights hard-linked)
  load       ``load_workdir_params`` of that WORKDIR onto one device (what a fine-tuning run does)

Target (HF interop issue): peak <= 1.5 x checkpoint size.

    python benchmarks/hf_import_memory.py --out benchmarks/hf_import_memory.json [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from moejax.config import ModelConfig
from moejax.interop.qwen3 import plan
from moejax.interop import qwen3
from moejax.interop.safetensors_dir import write_safetensors_dir


def hf_config(layers: int, d: int, ff: int, vocab: int, heads: int, kv: int, hd: int) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
            "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "rope_theta": 1e6, "torch_dtype": "bfloat16"}


def write_checkpoint(directory: str, hf: dict, shard_gb: float) -> tuple[int, int]:
    """Random bf16 tensors for every parameter; returns (parameters, bytes)."""
    model: ModelConfig = qwen3.config_from_hf(hf, param_dtype="bfloat16")
    rng = np.random.default_rng(0)
    specs = []
    for leaf in plan(model):
        for idx in np.ndindex(*leaf.names.shape):
            shape = leaf.hf_shape()
            specs.append((leaf.names[idx], shape, np.dtype(ml_dtypes.bfloat16),
                          lambda shape=shape: (0.02 * rng.standard_normal(shape, np.float32))
                          .astype(ml_dtypes.bfloat16)))
    write_safetensors_dir(directory, specs, max_shard_bytes=int(shard_gb * (1 << 30)))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    n = sum(int(np.prod(s[1])) for s in specs)
    return n, 2 * n


CHILD = {
    "baseline": "import jax, moejax.interop.hf; jax.devices(); print('ok')",
    "import": ("import jax; from moejax.interop import hf; from moejax.config import MeshConfig; "
               "from moejax.mesh import make_mesh; m = MeshConfig(data=1); "
               "cfg, p, r = hf.import_hf({src!r}, mesh=make_mesh(m, jax.devices()[:1]), mesh_cfg=m); "
               "jax.block_until_ready(p); print(r['consumed'])"),
    "load": ("import json, jax; from moejax.interop import hf; from moejax.config import Config, "
             "MeshConfig; m = MeshConfig(data=1); cfg = Config.from_dict(json.load(open("
             "{work!r} + '/config.json'))); mesh = hf.mesh_for(m); "
             "t = hf.abstract_params(cfg.model, mesh, m); "
             "p = hf.load_workdir_params({work!r}, cfg.model, t); jax.block_until_ready(p)"),
}


def peak_rss_of(code: str | None, argv: list[str] | None = None) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a fresh python process running ``code`` or ``argv``."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, *argv]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    t0 = time.time()
    # ru_maxrss of RUSAGE_CHILDREN is the max over waited-for children: run each via a wrapper
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    return float(out[-1]) * 1024, time.time() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/hf_import_memory.json")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="moejax-hfmem-")
    src, work = os.path.join(root, "hf"), os.path.join(root, "work")
    hf = hf_config(args.layers, args.d, args.ff, args.vocab, 16, 8, 128)
    t0 = time.time()
    params, nbytes = write_checkpoint(src, hf, args.shard_gb)
    print(f"checkpoint: {params / 1e9:.2f}B params, {nbytes / 2**30:.2f} GiB bf16 "
          f"({time.time() - t0:.0f} s to write)")
    rows = {}
    for name in ("baseline", "import"):
        rows[name] = peak_rss_of(CHILD[name].format(src=src))
    rows["cli"] = peak_rss_of(None, ["-m", "moejax.interop.hf", "import", src, "--out", work,
                                     "--mesh", "data=1"])
    rows["load"] = peak_rss_of(CHILD["load"].format(work=work))
    print("\n| process | peak RSS GiB | x checkpoint | (peak - baseline) x checkpoint | s |")
    print("|---|---|---|---|---|")
    base = rows["baseline"][0]
    result = {"params": params, "checkpoint_bytes": nbytes, "date": time.strftime("%Y-%m-%d"),
              "machine": os.uname().nodename, "cpus": os.cpu_count(), "rows": {}}
    for name, (rss, secs) in rows.items():
        print(f"| {name} | {rss / 2**30:.2f} | {rss / nbytes:.2f} | {(rss - base) / nbytes:.2f} "
              f"| {secs:.0f} |")
        result["rows"][name] = {"peak_rss_bytes": rss, "ratio": rss / nbytes,
                                "ratio_above_baseline": (rss - base) / nbytes, "seconds": secs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if not args.dir:
        shutil.rmtree(root)
    return result


if __name__ == "__main__":
    main()
