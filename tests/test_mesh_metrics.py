"""Mesh construction, logical-axis rules and the metrics file."""

import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

from moejax.config import ConfigError, MeshConfig
from moejax.mesh import RULES, logical_to_spec, make_mesh
from moejax.metrics import MetricsLogger, read_metrics, truncate_after


def test_make_mesh_axes_sizes_and_types():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="multiply to 4 but 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2))


def test_logical_rules_use_each_mesh_axis_once():
    rules = RULES["default"]
    assert logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("unknown_name", None), rules) == P(None, None)


def test_metrics_truncate_on_resume(tmp_path):
    wd = str(tmp_path)
    log = MetricsLogger(wd)
    for s in range(1, 6):
        log.log(s, {"train/loss": 1.0 / s, "val/loss/code": float("nan")})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    truncate_after(str(tmp_path / "metrics.jsonl"), 3)
    log = MetricsLogger(wd, resume_step=3)
    log.log(4, {"train/loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a torn line from a crash is ignored
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
