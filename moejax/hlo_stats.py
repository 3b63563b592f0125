"""Per-step statistics read from a compiled (optimized) HLO module's text, for ``moejax.aot``.

``compiled.cost_analysis()`` counts the body of a ``while`` (a scanned layer stack, the grad-accum
scan) once; here every computation is weighted by how many times one step runs it: the trip count
of each enclosing ``while`` (from ``known_trip_count``, or its condition ``i < N`` and the step
the body adds to ``i``) times the weight of the computation that calls it. On that weighting:

- ``flops``: matmuls, i.e. ``dot`` and ``convolution`` (TPU writes dots as convolutions; window
  taps that fall in padding are not counted), plus the ``cost_estimate`` of Pallas
  ``tpu_custom_call`` kernels. Element-wise work is left out (it is not what MFU counts).
- ``hbm_bytes``: operand + result bytes of every kernel the step launches (fusions, custom calls,
  collectives, copies; a (dynamic-)slice counts the slice, an in-place dynamic-update-slice or
  scatter the update): an estimate of HBM traffic, for the roofline.
- ``collectives``: count, payload bytes and per-chip wire bytes (ring algorithms) per kind;
  ``dcn-send``: the sends between slices of a multi-slice program (Megascale), over DCN.
- ``kernels``: the Pallas custom calls by kernel name (``splash_mha_fwd...``, ``gmm``, ``tgmm``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+|token)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
DCN = "dcn-send"
TPU_CUSTOM_CALL = 'custom_call_target="tpu_custom_call"'
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
# ops that move no data themselves (their bodies, if any, are counted where they run)
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
               "add-dependency", "async-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "copy-done", "send-done", "recv-done", "domain"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # result shape text, e.g. 'bf16[2,128]{1,0}' or a tuple '(f32[], s32[4])'
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    root: bool = False
    literal: int | None = None  # value of a scalar integer constant (trip counts)


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a shape text (a tuple gives several)."""
    out = []
    for dt, dims in _ARRAY.findall(shape):
        out.append((dt, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())))
    return out


def nbytes(shape: str) -> float:
    """Bytes of all arrays in a shape text (layout padding not included)."""
    return sum(DTYPE_BYTES.get(dt, 1) * math.prod(dims) for dt, dims in arrays(shape))


def _split_balanced(text: str, start: int) -> int:
    """Index just past the bracket that closes the one opening at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    if rest.startswith("("):
        end = _split_balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    om = re.match(r"([a-z][\w\-]*)\(", rest)
    if not om:
        return None
    opcode = om.group(1)
    end = _split_balanced(rest, om.end() - 1)
    inner = rest[om.end():end - 1]
    operands = re.findall(r"%([\w.\-]+)", inner)
    literal = int(inner) if opcode == "constant" and re.fullmatch(r"-?\d+", inner) else None
    return Instr(name, shape, opcode, operands, rest[end:], root, literal)


def parse_module(text: str) -> dict[str, Computation]:
    """Computations of an HLO module text by name (instructions spanning lines are joined)."""
    comps: dict[str, Computation] = {}
    name, entry, lines = None, False, []

    def flush():
        instrs = [i for i in (_parse_instr(l) for l in lines) if i is not None]
        if name and instrs:
            comps[name] = Computation(name, instrs, entry)

    for raw in text.splitlines():
        if name is None:
            h = _HEADER.match(raw)
            if h and not raw.startswith(" "):
                name, entry, lines = h.group(2), bool(h.group(1)), []
            continue
        if raw.rstrip() == "}":
            flush()
            name = None
        elif _INSTR.match(raw) and raw.startswith("  "):
            lines.append(raw)
        elif lines:  # continuation of a multi-line instruction (frontend attributes, metadata)
            lines[-1] += raw
    return comps


# -- call graph and trip counts -----------------------------------------------------------------

def _called(attrs: str, key: str) -> list[str]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs) or re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    if not m:
        return []
    return re.findall(r"%?([\w.\-]+)", m.group(1))


def trip_count(parent: Computation, w: Instr, comps: dict[str, Computation]) -> int | None:
    """Iterations of while ``w``: its ``known_trip_count``, else ``N - init`` from a condition
    ``compare(gte(param, i), constant N)`` and a constant init at tuple index i."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get((_called(w.attrs, "condition") or [""])[0])
    if cond is None:
        return None
    root = cond.root
    scope = cond
    if root.opcode == "fusion":  # compare fused with its operands
        scope = comps.get((_called(root.attrs, "calls") or [""])[0], cond)
        inner = scope.root
        ops = [cond.by_name.get(o) for o in root.operands]
        params = {i: ins for i, ins in enumerate(ops)}
        cmp_ops = []
        for o in inner.operands:
            p = scope.by_name.get(o)
            is_param = p is not None and p.opcode == "parameter"
            idx = re.match(r"\s*(\d+)", p.attrs) if is_param else None
            cmp_ops.append(params.get(int(idx.group(1))) if idx else p)
        root_dir = inner.attrs
    else:
        cmp_ops = [cond.by_name.get(o) for o in root.operands]
        root_dir = root.attrs
    if len(cmp_ops) != 2 or any(o is None for o in cmp_ops):
        return None
    direction = (re.search(r"direction=(\w+)", root_dir) or [None, "LT"])[1]
    limit, index, flipped = None, None, False
    for k, o in enumerate(cmp_ops):
        if o.opcode == "constant":
            limit = _literal(o)
            flipped = k == 0
        elif o.opcode == "get-tuple-element":
            im = re.search(r"index=(\d+)", o.attrs)
            index = int(im.group(1)) if im else None
    if limit is None:
        return None
    init = 0
    if index is not None and w.operands:
        tup = parent.by_name.get(w.operands[0])
        if tup is not None and tup.opcode == "tuple" and index < len(tup.operands):
            c = parent.by_name.get(tup.operands[index])
            if c is not None and c.opcode == "constant":
                init = _literal(c) or 0
    if flipped:
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    if direction not in ("LT", "LE"):
        return None
    step = _loop_step(comps.get((_called(w.attrs, "body") or [""])[0]), index)
    span = limit - init + (1 if direction == "LE" else 0)
    return max(-(-span // step), 0)


def trip_bound(parent: Computation, w: Instr, comps: dict[str, Computation]) -> int | None:
    """At most how many times while ``w`` runs when its condition is ``and(i < N, ...)`` (a
    loop with a data-dependent early exit, e.g. decoding until every row hit EOS): the
    smallest trip count of the ``and``'s counter compares, or None."""
    cond = comps.get((_called(w.attrs, "condition") or [""])[0])
    if cond is None or cond.root.opcode != "and":
        return None
    bounds = []
    for o in cond.root.operands:
        cmp = cond.by_name.get(o)
        if cmp is None or cmp.opcode != "compare":
            continue
        variant = Computation(cond.name, [dataclasses.replace(i, root=i is cmp)
                                          for i in cond.instrs])
        n = trip_count(parent, w, {**comps, cond.name: variant})
        if n is not None:
            bounds.append(n)
    return min(bounds) if bounds else None


def _loop_step(body: Computation | None, index: int | None) -> int:
    """The constant the body adds to loop-carried element ``index`` (1 if not a plain add):
    XLA's windowed-einsum loops advance their counter by 2 (two chunks per iteration)."""
    if body is None or index is None or body.root.opcode != "tuple" \
            or index >= len(body.root.operands):
        return 1
    upd = body.by_name.get(body.root.operands[index])
    if upd is None or upd.opcode != "add":
        return 1
    for o in upd.operands:
        c = body.by_name.get(o)
        if c is not None and c.opcode == "constant" and c.literal and c.literal > 0:
            return c.literal
    return 1


def _literal(ins: Instr) -> int | None:
    """The scalar integer a ``constant`` holds (``constant(24)``: the operand text)."""
    return ins.literal


def weights(comps: dict[str, Computation]) -> tuple[dict[str, float], set[str], list[str]]:
    """(times each computation runs per step, the fused computations, warnings)."""
    edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)  # child -> parents
    fused: set[str] = set()
    warnings = []
    for comp in comps.values():
        for ins in comp.instrs:
            if ins.opcode == "while":
                n = trip_count(comp, ins, comps)
                if n is None:
                    n = trip_bound(comp, ins, comps)
                    warnings.append(f"while {ins.name}: " + (
                        "unknown trip count, counted once" if n is None else
                        f"exits early on data, counted at its bound of {n} trips (worst case)"))
                    n = n or 1
                for b in _called(ins.attrs, "body"):
                    edges[b].append((comp.name, n))
                for c in _called(ins.attrs, "condition"):
                    edges[c].append((comp.name, n + 1))
            elif ins.opcode == "conditional":
                for key in ("branch_computations", "true_computation", "false_computation"):
                    for b in _called(ins.attrs, key):
                        edges[b].append((comp.name, 1))
            elif ins.opcode == "call":
                for b in _called(ins.attrs, "to_apply"):
                    edges[b].append((comp.name, 1))
            else:
                for b in _called(ins.attrs, "calls") + _called(ins.attrs, "called_computations"):
                    edges[b].append((comp.name, 1))
                    if ins.opcode == "fusion":
                        fused.add(b)
    memo: dict[str, float] = {}

    def weight(name: str, depth: int = 0) -> float:
        if name in memo:
            return memo[name]
        comp = comps.get(name)
        if comp is not None and comp.entry:
            memo[name] = 1.0
            return 1.0
        if depth > 200:
            return 0.0
        memo[name] = sum(weight(p, depth + 1) * f for p, f in edges.get(name, ()))
        return memo[name]

    return {n: weight(n) for n in comps}, fused, warnings


# -- statistics -----------------------------------------------------------------------------------

def conv_flops(comp: Computation, ins: Instr) -> float:
    """2 x multiply-adds of a convolution, counting only window taps inside the (unpadded) input."""
    lm = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not lm or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = lm.groups()
    lhs, rhs = (comp.by_name.get(o) for o in ins.operands[:2])
    out = arrays(ins.shape)
    if lhs is None or rhs is None or not out or not arrays(lhs.shape) or not arrays(rhs.shape):
        return 0.0
    lhs_d, rhs_d, out_d = arrays(lhs.shape)[0][1], arrays(rhs.shape)[0][1], out[0][1]
    win = re.search(r"window=\{([^}]*)\}", ins.attrs)
    wtext = win.group(1) if win else ""

    def field(key, n, default):
        m = re.search(rf"\b{key}=(\S+)", wtext)
        return [default] * n if not m else m.group(1).split("x")
    spatial = sorted(c for c in out_l if c.isdigit())
    sizes = [int(s) for s in field("size", len(spatial), "1")]
    strides = [int(s) for s in field("stride", len(spatial), "1")]
    pads = [tuple(int(v) for v in p.split("_")) for p in field("pad", len(spatial), "0_0")]
    lhs_dil = [int(s) for s in field("lhs_dilate", len(spatial), "1")]
    rhs_dil = [int(s) for s in field("rhs_dilate", len(spatial), "1")]
    taps = 1.0
    for k, s in enumerate(spatial):
        n, o = lhs_d[lhs_l.index(s)], out_d[out_l.index(s)]
        taps *= _valid_taps(n, sizes[k], pads[k][0], strides[k], o, lhs_dil[k], rhs_dil[k])
    nonspatial = math.prod(out_d[j] for j, c in enumerate(out_l) if not c.isdigit())
    return 2.0 * nonspatial * taps * rhs_d[rhs_l.index("i")]


def _valid_taps(n: int, k: int, lo: int, stride: int, out: int, ldil: int, rdil: int) -> float:
    """Sum over output positions of the window taps that land on a real input element."""
    o = np.arange(out)[:, None] * stride
    w = np.arange(k)[None, :] * rdil
    idx = o + w - lo
    ok = (idx >= 0) & (idx <= (n - 1) * ldil) & (idx % ldil == 0)
    return float(ok.sum())


def dot_flops(comp: Computation, ins: Instr) -> float:
    lhs = comp.by_name.get(ins.operands[0]) if ins.operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    out = arrays(ins.shape)
    if lhs is None or not m or not out or not arrays(lhs.shape):
        return 0.0
    dims = arrays(lhs.shape)[0][1]
    k = math.prod(dims[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * math.prod(out[0][1]) * k


def custom_call_cost(ins: Instr) -> dict:
    m = re.search(r'"cost_estimate":\{([^}]*)\}', ins.attrs)
    if not m:
        return {}
    return {k: float(v) for k, v in re.findall(r'"(\w+)":"?([\d.eE+\-]+)"?', m.group(1))}


# matmuls of [T,S] size per splash kernel: fwd QK^T, PV; dq QK^T, dO V^T, dS K; dkv QK^T, dO V^T,
# P^T dO, dS^T Q (a fused backward does the dq and dkv work in one kernel)
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "bwd": 5}


def splash_flops(comp: Computation, ins: Instr) -> float:
    """FLOPs of a splash-attention kernel (it carries no cost estimate): 2*B*H*T*S*hd per
    [T,S] matmul, times the share of causal blocks it visits ((n+1)/2n for n x n blocks)."""
    name = kernel_name(ins)
    kind = next((k for k in SPLASH_MATMULS if f"_{k}" in name), None)
    shapes = [arrays(comp.by_name[o].shape)[0] for o in ins.operands
              if o in comp.by_name and arrays(comp.by_name[o].shape)]
    four = [d for dt, d in shapes if len(d) == 4 and dt in ("bf16", "f32", "f16")]
    if kind is None or not four:
        return 0.0
    B, H, T, hd = max(four, key=math.prod)
    # the block-mask tables are s8 [heads, q blocks, kv blocks]; else the block_q metadata
    masks = [d for dt, d in shapes if dt == "s8" and len(d) == 3]
    m = re.search(r'block_q\\?": (\d+)', ins.attrs)
    n = masks[0][1] if masks else (T // int(m.group(1)) if m and int(m.group(1)) else 1)
    return SPLASH_MATMULS[kind] * 2.0 * B * H * T * T * hd * (n + 1) / (2 * n)


def kernel_name(ins: Instr) -> str:
    """'splash_mha_fwd_segmented_residuals.3' -> 'splash_mha_fwd_segmented_residuals'."""
    return re.sub(r"(\.\d+)+$", "", ins.name)


def group_size(attrs: str, num_devices: int) -> int:
    """Participants per group of a collective from its ``replica_groups``."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((a.strip(" '"), int(s)) for a, s in re.findall(r"([^,=]+)=(\d+)", m.group(1)))
        axes = [a.strip(" '") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes) if axes else num_devices
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return num_devices


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-6] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def collective_bytes(comp: Computation, ins: Instr, kind: str, n: int) -> tuple[float, float]:
    """(payload bytes, bytes one chip sends) of one collective over groups of ``n`` chips."""
    operand_bytes = sum(nbytes(comp.by_name[o].shape) for o in ins.operands if o in comp.by_name)
    result = max((DTYPE_BYTES.get(dt, 1) * math.prod(d) for dt, d in arrays(ins.shape)), default=0)
    if kind == "all-gather":
        payload = result
    elif kind == "ragged-all-to-all":
        src = comp.by_name.get(ins.operands[0])
        payload = nbytes(src.shape) if src is not None else 0
    else:
        payload = operand_bytes or result
    share = (n - 1) / n if n > 1 else 0.0
    wire = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share) * payload
    return payload, wire


IN_PLACE = ("dynamic-update-slice", "scatter")  # buffer updated in place: only the update moves


def _update_bytes(comp: Computation, ins: Instr) -> float:
    """Bytes an in-place update writes: a dynamic-update-slice's update (operand 1), a
    scatter's updates (its operands after the buffer and the indices)."""
    ops = ins.operands[1:2] if ins.opcode == "dynamic-update-slice" else ins.operands[2:]
    return sum(nbytes(comp.by_name[o].shape) for o in ops if o in comp.by_name)


def fusion_traffic(comps: dict[str, Computation], comp: Computation, ins: Instr) -> float:
    """Operand + result bytes of a fusion, counting (dynamic-)sliced operands by their slice
    (one layer of a stacked KV cache) and buffers updated in place (dynamic-update-slice,
    scatter: a KV-cache write) by the update."""
    body = comps.get((_called(ins.attrs, "calls") or [""])[0])
    if body is None:
        return nbytes(ins.shape) + sum(nbytes(comp.by_name[o].shape) for o in ins.operands
                                       if o in comp.by_name)
    params = {}
    users = collections.defaultdict(list)
    for i in body.instrs:
        if i.opcode == "parameter":
            m = re.match(r"\s*(\d+)", i.attrs) or re.search(r"parameter\((\d+)\)", i.attrs)
            params[int(m.group(1)) if m else len(params)] = i
        for o in i.operands:
            users[o].append(i)
    total = 0.0
    for k, o in enumerate(ins.operands):
        p = params.get(k)
        us = users.get(p.name, []) if p is not None else []
        if us and all(u.opcode in ("slice", "dynamic-slice") and u.operands[0] == p.name
                      for u in us):
            total += sum(nbytes(u.shape) for u in us)
        elif us and all(u.opcode in IN_PLACE and u.operands[0] == p.name for u in us):
            continue  # updated in place: the write is counted with the result
        elif o in comp.by_name:
            total += nbytes(comp.by_name[o].shape)
    root = body.root
    outs = [body.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    for r in outs:
        if r is not None and r.opcode in IN_PLACE and len(r.operands) > 1:
            total += _update_bytes(body, r)
        elif r is not None:
            total += nbytes(r.shape)
    return total


def traffic(comps: dict[str, Computation], comp: Computation, ins: Instr) -> float:
    """Estimated HBM bytes one execution of a top-level instruction moves."""
    if ins.opcode in _NO_TRAFFIC or ins.opcode.endswith("-done"):
        return 0.0
    if ins.opcode == "custom-call" and TPU_CUSTOM_CALL not in ins.attrs:
        return 0.0
    if ins.opcode == "fusion":
        return fusion_traffic(comps, comp, ins)
    if ins.opcode == "dynamic-slice":
        return 2 * nbytes(ins.shape)
    if ins.opcode in IN_PLACE and len(ins.operands) > 1:
        return 2 * _update_bytes(comp, ins)
    operands = sum(nbytes(comp.by_name[o].shape) for o in ins.operands if o in comp.by_name)
    return nbytes(ins.shape) + operands


@dataclasses.dataclass
class StepStats:
    flops: float  # matmul + Pallas kernel FLOPs per chip per step
    flops_by_source: dict  # 'xla_matmul' / 'pallas_matmul' (gmm, tgmm) / 'splash' -> FLOPs
    hbm_bytes: float
    collectives: dict  # kind -> {'count', 'payload_bytes', 'wire_bytes'}
    kernels: dict  # Pallas kernel name -> executions per step
    warnings: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_stats(text: str, num_devices: int) -> StepStats:
    """Weighted per-step statistics of one chip's program (see the module docstring)."""
    comps = parse_module(text)
    w, fused, warnings = weights(comps)
    flops = collections.Counter()
    hbm = 0.0
    coll = collections.defaultdict(lambda: {"count": 0.0, "payload_bytes": 0.0, "wire_bytes": 0.0})
    kernels = collections.Counter()
    for comp in comps.values():
        c = w.get(comp.name, 0.0)
        if c == 0:
            continue
        for ins in comp.instrs:
            if ins.opcode == "convolution":
                flops["xla_matmul"] += c * conv_flops(comp, ins)
            elif ins.opcode == "dot":
                flops["xla_matmul"] += c * dot_flops(comp, ins)
            elif ins.opcode == "custom-call" and TPU_CUSTOM_CALL in ins.attrs:
                cost = custom_call_cost(ins).get("flops")
                source = "splash" if kernel_name(ins).startswith("splash") else "pallas_matmul"
                flops[source] += c * (splash_flops(comp, ins) if cost is None else cost)
                kernels[kernel_name(ins)] += c
            kind = _collective_kind(ins.opcode)
            if ins.opcode == "send":  # multi-slice: Megascale sends between slices (DCN)
                payload = sum(nbytes(comp.by_name[o].shape) for o in ins.operands[:1]
                              if o in comp.by_name)
                entry = coll[DCN]
                entry["count"] += c
                entry["payload_bytes"] += c * payload
                entry["wire_bytes"] += c * payload
            elif kind:
                n = group_size(ins.attrs, num_devices)
                payload, wire = collective_bytes(comp, ins, kind, n)
                entry = coll[kind]
                entry["count"] += c
                entry["payload_bytes"] += c * payload
                entry["wire_bytes"] += c * wire
            if comp.name not in fused:
                hbm += c * traffic(comps, comp, ins)
    return StepStats(flops=float(sum(flops.values())), flops_by_source=dict(flops),
                     hbm_bytes=hbm, collectives={k: dict(v) for k, v in coll.items()},
                     kernels=dict(kernels), warnings=warnings)


def dumps(stats: StepStats) -> str:
    return json.dumps(stats.to_dict(), indent=2, sort_keys=True)
