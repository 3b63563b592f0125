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


def _fake_devices(n: int, slices: int) -> list:
    """CPU-like devices that carry a ``slice_index`` (as TPU devices of a multi-slice job do)."""
    import types
    return [types.SimpleNamespace(id=i, platform="cpu", device_kind="cpu", process_index=i,
                                  slice_index=i * slices // n) for i in range(n)]


def test_device_grid_runs_the_data_axis_across_slices():
    """8 devices in 2 slices, fsdp 2 per slice: the config lays out each slice (data 2 x fsdp 2)
    and the data axis spans both (4): an fsdp group never leaves its slice; data rows 0-1 are
    slice 0's, 2-3 slice 1's; given in any order, slices are taken by their index."""
    from moejax.mesh import device_grid
    devices = _fake_devices(8, 2)
    grid = device_grid(MeshConfig(data=-1, fsdp=2), devices[::-1])
    assert grid.shape == (4, 2, 1, 1)
    slice_of = [[d.slice_index for d in row] for row in grid[:, :, 0, 0]]
    assert slice_of == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert sorted(d.id for d in grid.flat) == list(range(8))
    one = device_grid(MeshConfig(data=1, fsdp=-1), devices)  # the per-slice config's data=1
    assert one.shape == (2, 4, 1, 1)
    assert [{d.slice_index for d in row} for row in one[:, :, 0, 0]] == [{0}, {1}]


def test_device_grid_refuses_slices_of_different_sizes():
    from moejax.mesh import device_grid
    devices = _fake_devices(8, 2)[:6]  # 4 + 2
    with pytest.raises(ConfigError, match="as many devices in every slice"):
        device_grid(MeshConfig(data=-1), devices)


def test_make_mesh_on_one_slice_lays_devices_out_as_jax_make_mesh():
    cfg = MeshConfig(data=-1, fsdp=2, tensor=2)
    ours = make_mesh(cfg)
    ref = jax.make_mesh((2, 2, 1, 2), MeshConfig.AXES, devices=jax.devices())
    assert [d.id for d in ours.devices.flat] == [d.id for d in ref.devices.flat]
