"""Per-chip TPU figures for the ahead-of-time fit check and the roofline (``moejax.aot``).

One row per generation: HBM capacity (what ``memory_analysis`` totals are compared with), peak
dense bf16 FLOP/s, HBM bandwidth, bidirectional ICI bandwidth (all ports together) and DCN
bandwidth per chip. Sources, read 2026-12 (Google Cloud TPU system-architecture pages):
  v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s, 32 GiB at 1200 GB/s, 3D torus (6 ports);
       ICI 6 links x 45 GB/s each way = 540 GB/s bidirectional (the v4 page gives no per-chip
       figure; links from the TPU v4 paper / jax-ml "How to Scale Your Model", TPU chapter)
  v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s
       bidirectional (1600 Gbps), 2D torus (4 ports); DCN 2 x 100 Gbps NIC per 8-chip host
  v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s
       bidirectional (4800 Gbps), 3D torus (6 ports), DCN 50 Gbps per chip
  v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s
       bidirectional, 2D torus (4 ports)
DCN per chip: v5p 50 Gbps (its page); v5e 2 x 100 Gbps NICs per 8-chip host = 25 Gbps per chip,
assumed the same for v6e; v4 assumed as v5p. The issue fixes capacities at v4 32 GiB, v5e 16 GiB,
v5p 95 GiB, v6e 32 GiB; the TPU compiler itself refuses a program over what it can allocate (for
v5e it reported 15.75 GiB available), which ``moejax.aot`` turns into ``DoesNotFit``.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation, per chip."""

    name: str  # 'v5p', as in topology names ('v5p:2x4x4') and accelerator types ('v5p-64')
    device_kind: str  # jax's ``device.device_kind``
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, bidirectional, all ports of the chip together
    dcn_bw: float  # bytes/s per chip between slices
    cores_per_chip: int  # accelerator types count TensorCores on v4/v5p: 'v5p-64' = 32 chips
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)

    @property
    def ici_egress_bw(self) -> float:
        """Bytes/s a chip can send over ICI (half the bidirectional figure)."""
        return self.ici_bw / 2


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 540e9, 50e9 / 8, 2, 3),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 400e9, 200e9 / 8 / 8, 1, 2),
    "v5p": ChipSpec("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 1200e9, 50e9 / 8, 2, 3),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1638e9, 800e9, 200e9 / 8 / 8, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}

# Common slice shapes by chip count (Cloud TPU docs' topology tables).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}


def chip(name: str) -> ChipSpec:
    """The spec of a generation named as in a topology ('v5p:2x4x4'), an accelerator type
    ('v5litepod-16', 'v5p-64') or a bare name ('v6e')."""
    gen = re.split(r"[:\-]", name.strip().lower(), maxsplit=1)[0]
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {name!r}; known: {sorted(CHIPS)}")
    return CHIPS[gen]


def chip_for_device_kind(kind: str) -> ChipSpec:
    """The spec matching ``device.device_kind`` ('TPU v5', 'TPU v5 lite', ...)."""
    for spec in CHIPS.values():
        if spec.device_kind.lower() == kind.strip().lower():
            return spec
    raise ValueError(f"no chip spec for device kind {kind!r}")


def topology_for_accelerator(accelerator: str) -> str:
    """'v5p-64' -> 'v5p:2x4x4' (64 cores = 32 chips), 'v5e-16' -> 'v5e:4x4': the slice shape
    ``jax.experimental.topologies`` takes for an accelerator type."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator.strip().lower())
    if not m:
        raise ValueError(f"accelerator type {accelerator!r} is not of the form 'v5p-64'")
    spec = chip(m.group(1))
    chips = int(m.group(2)) // spec.cores_per_chip
    shapes = SHAPES_3D if spec.torus_dims == 3 else SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"no standard {spec.name} slice of {chips} chips; pass --topology "
                         f"{spec.name}:AxB{'xC' if spec.torus_dims == 3 else ''}")
    return f"{spec.name}:{shapes[chips]}"
