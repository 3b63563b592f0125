"""Growth operators on train state (spec: shared/methods/architecture.md section 5, "Stacking Your
Transformers"): depthwise G_stack / G_zero / G_random / G_learn and widthwise G_split / G_zero /
G_random, applied to a (sharded) ``TrainState`` of a source model and returning the target model's
``TrainState`` created directly with the target shardings.

How it works: ``grow(state, src, dst, op)`` runs one ``jit`` with ``out_shardings =
dst.state_shardings``. Inside, a fresh target model is initialised (seed ``dst.cfg.train.seed``, so
"random" parts equal a scratch init of the target) and the operator maps the source parameters
(nested pure dicts, one dict per layer whatever ``scan_layers`` is) onto it.

Operators (``OPS``) and what they preserve:
  * ``stack``        G_stack: target layer l = source layer ``l mod L_s`` (block repeat, the paper
                     and `stackingpt.py`) or ``l // g`` (``stack_mode='interleave'``).
  * ``zero_depth``   G_zero depth: source layers kept in order, new layers inserted after each
                     source layer (``new_layers='interleave'``) or on top ('top'), each a copy of a
                     source layer (``new_layer_init='copy'``: the one before it; on top, source
                     layer ``l mod L_s``) or the fresh init ('fresh'), with its output projections
                     (attn ``o``, mlp ``down`` / expert ``w_down`` / shared ``down``) zero: every
                     new block is the identity -> function preserving.
  * ``random_depth`` G_random depth (MSG, prts ``msg.py``): new layers from the fresh init, their
                     residual branches faded in by m(t) = min(1, t / ``fade_in_steps``) over the
                     grown phase's first steps (``fade_in_optimizer``; 0 = no mask: the full
                     random layers from step 0). Function preserving at t = 0 when masked.
  * ``learn_depth``  G_learn (LiGO-style, **depth only**: no width map): target layer
                     l = sum_j M[l, j] * source layer j for every per-layer tensor, one
                     M [L_t, L_s] per tensor name, initialised to the G_stack map and fitted by
                     Adam on the LM loss for a few batches (``growth_learn.learn_depth``);
                     embeddings / final norm are copied.
  * ``split``        G_split (Net2Net): MLP neurons (dense d_ff, expert d_expert, shared) and
                     attention heads duplicated cyclically; each copy's output row (down / o)
                     takes a share of the source row, shares summing to 1 ('even', or 'random' to
                     break the copies' symmetry): function preserving exactly (up to fp rounding).
                     Heads: query heads are copied within their KV group so they keep their K/V;
                     KV heads may grow by an integer factor (copies). Not for gated attention.
  * ``zero_width``   G_zero width: old neurons / heads kept, new ones take fresh input weights and
                     zero output weights: function preserving. (All-zero new weights, as in prts
                     `zero.py`, would never receive a gradient.) KV heads must not grow.
  * ``random_width`` G_random width: as zero_width with fresh output weights too.

Optimizer state: ``optimizer='fresh'`` (default, the paper's choice) re-initialises AdamW for the
target; ``'transform'`` maps Adam's mu/nu with the same operator (copies take the source moments
unscaled, since Adam's update is invariant to the gradient scale; new parameters get zero
moments) and keeps Adam's count. ``step`` is reset to 0 (the grown phase has its own LR schedule).
Router state (``rest``: RouterBias, TokenMask) follows the layer map in depth ops (copies, of
G_stack or G_zero, keep their source layer's bias; fresh new layers take the fresh init) and is
kept as is in width ops. G_random's fade-in needs the target setup's optimizer wrapped
(``with_fade_in``; ``moejax.grow_run.GrownTrainer`` does it for runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import train as T
from moejax.config import DENSE_TO_MOE_OPS, Config, ConfigError, ModelConfig
from moejax.mesh import rules_for, use_mesh
from moejax.model import Model

Tree = dict[Any, Any]
OUT_PROJ = (("attn", "o"), ("mlp", "down"), ("mlp", "w_down"), ("mlp", "shared", "down"))


# -- per-layer views of a pure state dict ------------------------------------------------------
def split_layers(tree: Tree, m: ModelConfig) -> tuple[Tree, list[Tree]]:
    """A pure dict -> (its non-layer part, one dict per layer), for unrolled or scanned layers."""
    top = {k: v for k, v in tree.items() if k != "layers"}
    lay = tree.get("layers", {})
    if not lay:
        return top, [{} for _ in range(m.num_layers)]
    if m.scan_layers:
        return top, [jax.tree.map(lambda x, i=i: x[i], lay) for i in range(m.num_layers)]
    return top, [lay.get(i, {}) for i in range(m.num_layers)]


def join_layers(top: Tree, layers: list[Tree], m: ModelConfig) -> Tree:
    if not any(jax.tree.leaves(lay) for lay in layers):
        return dict(top)
    if m.scan_layers:
        return {**top, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {**top, "layers": {i: lay for i, lay in enumerate(layers) if lay}}


def _names(path) -> tuple:
    return tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)


def map_out_proj(layer: Tree, fn: Callable[[jax.Array], jax.Array]) -> Tree:
    """Apply ``fn`` to a layer's output projections (attn o, mlp down, expert w_down, shared down)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if _names(p) in OUT_PROJ else x, layer)


# -- depth plans ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NewLayer:
    """A new target layer: a copy of source layer ``copy_of`` (None: the fresh init), its output
    projections scaled by ``out_scale`` (0 = G_zero: the block is the identity)."""

    out_scale: float
    copy_of: int | None = None


def stack_plan(num_src: int, num_dst: int, mode: str = "block") -> list[int]:
    """G_stack source layer of every target layer: ``l mod L_s`` (block) or ``l // g``."""
    if num_dst % num_src:
        raise ValueError(f"G_stack: target depth {num_dst} must be a multiple of {num_src}")
    g = num_dst // num_src
    if mode == "block":
        return [l % num_src for l in range(num_dst)]
    if mode == "interleave":
        return [l // g for l in range(num_dst)]
    raise ValueError(f"stack_mode={mode!r}: choose 'block' or 'interleave'")


def new_layer_plan(num_src: int, num_dst: int, position: str, out_scale: float,
                   init: str = "fresh") -> list:
    """Source layers in order plus new layers: after each source layer (a copy of it with
    ``init='copy'``), or all on top (target layer l copies source layer ``l mod L_s``)."""
    if num_dst < num_src:
        raise ValueError(f"depth growth: target depth {num_dst} < source depth {num_src}")
    if init not in ("copy", "fresh"):
        raise ValueError(f"new_layer_init={init!r}: choose 'copy' or 'fresh'")

    def new(j: int) -> NewLayer:
        return NewLayer(out_scale, j if init == "copy" else None)

    if position == "top":
        return list(range(num_src)) + [new(l % num_src) for l in range(num_src, num_dst)]
    if position != "interleave":
        raise ValueError(f"new_layers={position!r}: choose 'interleave' or 'top'")
    if num_dst % num_src:
        raise ValueError(f"interleaved growth: target depth {num_dst} must be a multiple of {num_src}")
    return [x for j in range(num_src) for x in [j] + [new(j)] * (num_dst // num_src - 1)]


def apply_plan(src_layers: list[Tree], fresh_layers: list[Tree], plan: list, *,
               kind: str = "params") -> list[Tree]:
    """Target layers of a depth plan. ``kind``: 'params' (new layers: copy or fresh, output
    projections scaled), 'moments' (new layers: ``fresh_layers``, i.e. zero Adam moments) or
    'rest' (router state: copies follow their source layer, fresh layers the fresh init)."""
    out = []
    for l, p in enumerate(plan):
        if not isinstance(p, NewLayer):
            out.append(src_layers[p])
            continue
        if kind == "moments" or p.copy_of is None:
            lay = fresh_layers[l]
        else:
            lay = src_layers[p.copy_of]
        if kind == "params" and p.out_scale != 1.0:
            lay = map_out_proj(lay, lambda x, s=p.out_scale: x * s)
        out.append(lay)
    return out


def _check_layer_types(src: ModelConfig, dst: ModelConfig, plan: list) -> None:
    for l, p in enumerate(plan):
        if not isinstance(p, NewLayer) and src.moe.is_moe_layer(p) != dst.moe.is_moe_layer(l):
            raise ValueError(f"target layer {l} ({'MoE' if dst.moe.is_moe_layer(l) else 'dense'}) "
                             f"cannot copy source layer {p} of the other kind")


# -- width maps ---------------------------------------------------------------------------------
def _take(src, idx, axis):
    return jnp.take(src, jnp.asarray(np.maximum(idx, 0)), axis=axis)


def _grow_axis(src, fresh, idx: np.ndarray, axis: int, share=None, *, new: str):
    """Target tensor along ``axis``: entry j is ``src[idx[j]] * share[j]`` (idx >= 0) or, for new
    entries (idx = -1), fresh (new='fresh') or zero (new='zero')."""
    shape = [1] * src.ndim
    shape[axis] = len(idx)
    kept = _take(src, idx, axis)
    if share is not None:
        kept = kept * jnp.reshape(share, shape).astype(kept.dtype)
    other = fresh if new == "fresh" else jnp.zeros_like(fresh)
    return jnp.where(jnp.reshape(idx >= 0, shape), kept, other)


def neuron_map(n_src: int, n_dst: int, mode: str) -> np.ndarray:
    """Source neuron of each target neuron: cyclic copies (split) or old then new (-1)."""
    if n_dst < n_src:
        raise ValueError(f"width growth: target size {n_dst} < source size {n_src}")
    j = np.arange(n_dst)
    return j % n_src if mode == "split" else np.where(j < n_src, j, -1)


def split_shares(idx: np.ndarray, key, how: str) -> jax.Array:
    """Share of its source row each copy takes; the shares of one source's copies sum to 1."""
    counts = np.bincount(idx, minlength=idx.max() + 1)[idx].astype(np.float32)
    if how == "even":
        return jnp.asarray(1.0 / counts)
    r = jax.random.uniform(key, idx.shape, minval=0.5, maxval=1.5)
    return r / jax.ops.segment_sum(r, jnp.asarray(idx), num_segments=int(idx.max()) + 1)[idx]


def head_maps(src: ModelConfig, dst: ModelConfig, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(query-head map [H_t], kv-head map [Hkv_t]); -1 = new head. Copies stay in their KV group."""
    a, b = src.attention, dst.attention
    H, K, H2, K2 = a.num_heads, a.num_kv_heads, b.num_heads, b.num_kv_heads
    n, n2 = H // K, H2 // K2
    if a.head_dim != b.head_dim:
        raise ValueError("width growth keeps head_dim; grow num_heads / num_kv_heads instead")
    if (H, K) == (H2, K2):
        return np.arange(H), np.arange(K)
    if getattr(a, "gate", "none") != "none" or getattr(a, "sink", False):
        raise ValueError("head growth supports plain GQA attention only (no gate / sink)")
    if mode != "split":
        if K2 != K or n2 < n:
            raise ValueError("zero/random head growth keeps num_kv_heads and adds query heads")
        q = np.array([g * n + i if i < n else -1 for g in range(K) for i in range(n2)])
        return q, np.arange(K)
    if K2 % K or (K2 // K) * n2 < n:
        raise ValueError(f"head split {H}/{K} -> {H2}/{K2}: kv heads must grow by an integer "
                         "factor r and r * (new heads per group) >= old heads per group")
    r = K2 // K
    kv = np.arange(K2) // r
    q = np.array([kv[c] * n + ((c % r) * n2 + i) % n for c in range(K2) for i in range(n2)])
    return q, kv


def _mlp_width(src: Tree, fresh: Tree, idx, share, new_in: str, new_out: str, ax_in: int,
               ax_out: int, in_names=("gate", "up"), out_name="down") -> Tree:
    out = dict(fresh)
    for k in in_names:
        out[k] = _grow_axis(src[k], fresh[k], idx, ax_in, new=new_in)
    out[out_name] = _grow_axis(src[out_name], fresh[out_name], idx, ax_out, share, new=new_out)
    for k in src:
        if k not in (*in_names, out_name):
            out[k] = src[k]
    return out


def width_layer(src: Tree, fresh: Tree, sm: ModelConfig, dm: ModelConfig, layer: int, mode: str,
                key, *, split: str = "even", moments: bool = False) -> Tree:
    """One layer of G_split (mode='split') / G_zero width ('zero') / G_random width ('random')."""
    new_in = "zero" if moments else "fresh"
    new_out = "fresh" if mode == "random" and not moments else "zero"
    keys = iter(jax.random.split(key, 8))

    def shares(idx):
        return split_shares(idx, next(keys), split) if mode == "split" and not moments else None

    out = dict(src)
    qmap, kvmap = head_maps(sm, dm, mode)
    at, af = dict(src["attn"]), fresh["attn"]
    at["q"] = _grow_axis(src["attn"]["q"], af["q"], qmap, 1, new=new_in)
    for k in ("k", "v"):
        at[k] = _grow_axis(src["attn"][k], af[k], kvmap, 1, new=new_in)
    at["o"] = _grow_axis(src["attn"]["o"], af["o"], qmap, 0, shares(qmap), new=new_out)
    out["attn"] = at
    if "mlp" not in src or not src["mlp"]:
        return out
    if not dm.moe.is_moe_layer(layer):
        idx = neuron_map(sm.d_ff, dm.d_ff, mode)
        out["mlp"] = _mlp_width(src["mlp"], fresh["mlp"], idx, shares(idx), new_in, new_out, 1, 0)
        return out
    mlp = dict(src["mlp"])
    idx = neuron_map(sm.moe.d_expert, dm.moe.d_expert, mode)
    mlp.update(_mlp_width(src["mlp"], fresh["mlp"], idx, shares(idx), new_in, new_out, 2, 1,
                          ("w_gate", "w_up"), "w_down"))
    if "shared" in src["mlp"]:
        f_s = src["mlp"]["shared"]["gate"].shape[1]
        idx = neuron_map(f_s, fresh["mlp"]["shared"]["gate"].shape[1], mode)
        mlp["shared"] = _mlp_width(src["mlp"]["shared"], fresh["mlp"]["shared"], idx,
                                   shares(idx), new_in, new_out, 1, 0)
    out["mlp"] = mlp
    return out


# -- operators on pure dicts ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    """Operator knobs (mirrors ``GrowthConfig``)."""

    stack_mode: str = "block"
    new_layers: str = "interleave"
    new_layer_init: str = "copy"  # G_zero depth only; G_random's new layers are always fresh
    fade_in_steps: int = 0  # G_random depth: MSG ramp length (0 = no mask)
    split: str = "even"


def _depth_plan(op: str, sm: ModelConfig, dm: ModelConfig, o: Options) -> list:
    """The depth plan of ``op``. G_random's plan keeps the fresh output projections (scale 1):
    its MSG mask is applied by ``fade_in_optimizer`` / ``grow``, not folded into the plan."""
    if op == "stack":
        return stack_plan(sm.num_layers, dm.num_layers, o.stack_mode)
    if op == "zero_depth":
        return new_layer_plan(sm.num_layers, dm.num_layers, o.new_layers, 0.0, o.new_layer_init)
    return new_layer_plan(sm.num_layers, dm.num_layers, o.new_layers, 1.0, "fresh")


def new_layers_of(op: str, sm: ModelConfig, dm: ModelConfig, o: Options = Options()) -> list[int]:
    """Indices of the target layers a depth op adds (not taken from a source layer)."""
    if op not in ("zero_depth", "random_depth"):
        return []
    return [l for l, p in enumerate(_depth_plan(op, sm, dm, o)) if isinstance(p, NewLayer)]


def grow_tree(op: str, params: Tree, fresh: Tree, sm: ModelConfig, dm: ModelConfig, key,
              o: Options = Options(), *, moments: bool = False) -> Tree:
    """Apply operator ``op`` to a parameter pure dict (``moments=True``: an Adam moment tree,
    with ``fresh`` zeros: no output scaling, no random shares)."""
    top, src_layers = split_layers(params, sm)
    ftop, fresh_layers = split_layers(fresh, dm)
    if op in ("stack", "zero_depth", "random_depth"):
        plan = _depth_plan(op, sm, dm, o)
        _check_layer_types(sm, dm, plan)
        layers = apply_plan(src_layers, fresh_layers, plan,
                            kind="moments" if moments else "params")
    elif op in ("split", "zero_width", "random_width"):
        mode = op.split("_")[0]
        keys = jax.random.split(key, dm.num_layers)
        layers = [width_layer(s, f, sm, dm, l, mode, keys[l], split=o.split, moments=moments)
                  for l, (s, f) in enumerate(zip(src_layers, fresh_layers))]
    elif op == "identity":
        layers = src_layers
    else:
        raise ValueError(f"unknown growth op {op!r}; choose from {OPS}")
    return join_layers(top, layers, dm)


def grow_rest(op: str, rest: Tree, fresh: Tree, sm: ModelConfig, dm: ModelConfig,
              o: Options = Options()) -> Tree:
    """Router state: depth ops follow the layer plan; width ops keep it (same experts)."""
    if op not in ("stack", "zero_depth", "random_depth"):
        return rest
    top, src_layers = split_layers(rest, sm)
    _, fresh_layers = split_layers(fresh, dm)
    return join_layers(top, apply_plan(src_layers, fresh_layers, _depth_plan(op, sm, dm, o),
                                       kind="rest"), dm)


OPS = ("identity", "stack", "zero_depth", "random_depth", "split", "zero_width", "random_width")


# -- on train states -----------------------------------------------------------------------------
def _adam_states(opt_state) -> list:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def transform_opt(new_opt, old_opt, fn: Callable[[Tree, Tree], Tree]):
    """``new_opt`` with every ScaleByAdamState's mu/nu replaced by ``fn(old moments, new zeros)``
    (pure dicts) and the old count."""
    olds = iter(_adam_states(old_opt))
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731

    def swap(x):
        if not is_adam(x):
            return x
        old = next(olds)
        mom = lambda o, n: _replace(n, fn(o.to_pure_dict(), n.to_pure_dict()))  # noqa: E731
        return optax.ScaleByAdamState(count=old.count, mu=mom(old.mu, x.mu), nu=mom(old.nu, x.nu))

    return jax.tree.map(swap, new_opt, is_leaf=is_adam)


def _replace(state: nnx.State, pure: Tree) -> nnx.State:
    state = jax.tree.map(lambda x: x, state)  # a copy: replace_by_pure_dict works in place
    nnx.replace_by_pure_dict(state, pure)
    return state


def transform_state(state: T.TrainState, src: T.Setup, dst: T.Setup,
                    params_fn: Callable[[Tree, Tree, Any], Tree],
                    rest_fn: Callable[[Tree, Tree], Tree], *, key=None,
                    moments_fn: Callable[[Tree, Tree], Tree] | None = None,
                    stored_fn: Callable[[Tree], Tree] | None = None) -> T.TrainState:
    """The generic driver: in one jit (out_shardings = the target's), init a fresh target model,
    ``params_fn(src_params, fresh_params, key)`` and ``rest_fn(src_rest, fresh_rest)`` (pure
    dicts) give the target's; the optimizer is fresh, or mapped by ``moments_fn`` when given.
    ``stored_fn`` maps the parameters after the optimizer was initialised from them (MSG: the
    optimizer keeps the unmasked weights, the model holds the masked ones)."""
    del src
    cfg = dst.cfg
    key = jax.random.key(cfg.train.seed + 17) if key is None else key

    def run(params, rest, opt_state, rng, key):
        model = Model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        _, fparams, frest = nnx.split(model, nnx.Param, ...)
        new_params = _replace(fparams, params_fn(params.to_pure_dict(), fparams.to_pure_dict(), key))
        new_rest = _replace(frest, rest_fn(rest.to_pure_dict(), frest.to_pure_dict()))
        opt = dst.tx.init(new_params)
        if moments_fn is not None:
            opt = transform_opt(opt, opt_state, moments_fn)
        if stored_fn is not None:
            new_params = _replace(new_params, stored_fn(new_params.to_pure_dict()))
        return T.TrainState(step=jnp.zeros((), jnp.int32), params=new_params, rest=new_rest,
                            opt_state=opt, rng=rng)

    with use_mesh(dst.mesh, rules_for(cfg.mesh)):
        return jax.jit(run, out_shardings=dst.state_shardings)(
            state.params, state.rest, state.opt_state, state.rng, key)


def grow(state: T.TrainState, src: T.Setup, dst: T.Setup, op: str, *, options: Options = Options(),
         optimizer: str = "fresh", key=None) -> T.TrainState:
    """Grow ``state`` (a TrainState of ``src``) with operator ``op`` into ``dst``'s sharded state."""
    sm, dm = src.cfg.model, dst.cfg.model
    if op not in OPS:
        raise ValueError(f"unknown growth op {op!r}; choose from {OPS} "
                         "(or moejax.growth_learn.learn_depth)")
    if (sm.d_model, sm.vocab_size, sm.moe.num_experts) != (dm.d_model, dm.vocab_size,
                                                           dm.moe.num_experts):
        raise ValueError("growth keeps d_model, vocab_size and num_experts (see moejax.upcycle)")
    if optimizer not in ("fresh", "transform"):
        raise ValueError(f"optimizer={optimizer!r}: choose 'fresh' or 'transform'")
    moments_fn = stored_fn = None
    if optimizer == "transform":
        moments_fn = lambda old, zeros: grow_tree(op, old, zeros, sm, dm,  # noqa: E731
                                                  jax.random.key(0), options, moments=True)
    if op == "random_depth" and options.fade_in_steps > 0:
        if not isinstance(dst.abstract_state.opt_state, FadeInState):
            raise ValueError("G_random with fade_in_steps > 0 needs the target setup's optimizer "
                             "wrapped by fade_in_optimizer (use with_fade_in(dst, ...))")
        new = new_layers_of(op, sm, dm, options)
        m0 = float(fade_in_ramp(0, options.fade_in_steps))
        stored_fn = lambda p: scale_new_out_proj(p, dm, new, m0)  # noqa: E731
    return transform_state(
        state, src, dst,
        lambda p, f, k: grow_tree(op, p, f, sm, dm, k, options),
        lambda r, f: grow_rest(op, r, f, sm, dm, options), key=key, moments_fn=moments_fn,
        stored_fn=stored_fn)


# -- G_random's MSG fade-in ------------------------------------------------------------------------
# MSG (prts ``msg.py``) multiplies a new layer's output by a mask m(t) ramped 0 -> 1. Here the
# mask scales each residual branch of a new layer (attention ``o`` and FFN ``down`` projections:
# linear and bias-free, so m * W gives m * branch). prts masks the block as a whole,
# x + m (block(x) - x), whose FFN sees the unmasked attention output; the two agree at m = 0 and
# m = 1 and differ in between (the whole-block mask needs a per-layer gate in ``model.Block``).
# The model holds P = m(t) W; the optimizer keeps the unmasked W (``FadeInState.latent``), takes
# the gradient wrt W (m(t) dL/dP: the reparameterisation's exact gradient) and writes back
# P = m(t+1) W. The clock is the optimizer's own step count, so it is in every checkpoint.
def fade_in_ramp(step, ramp_steps: int) -> jax.Array:
    """MSG mask m(t) = min(1, t / ramp_steps) at grown-phase step t (prts: curr_step / grow_step,
    then 1); ``ramp_steps <= 0`` means no mask (m = 1)."""
    if ramp_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / ramp_steps)


def _layer_leaf(path, model: ModelConfig) -> tuple[int | None, tuple]:
    """(layer index or None for a scanned stack, names inside the layer) of a params leaf path;
    (-1, ()) for a leaf outside the layers."""
    names = tuple(n for n in _names(path) if n is not None)
    if not names or names[0] != "layers":
        return -1, ()
    return (None, names[1:]) if model.scan_layers else (names[1], names[2:])


def _is_faded(path, model: ModelConfig, new: np.ndarray) -> bool:
    """Whether a params leaf holds an output projection of a new layer (scanned: of any)."""
    layer, names = _layer_leaf(path, model)
    if layer == -1 or names not in OUT_PROJ:
        return False
    return bool(new.any()) if layer is None else bool(new[layer])


def _fade_mult(path, x, model: ModelConfig, new: np.ndarray, m):
    """The multiplier of a faded leaf ``x``: m (unrolled) or [L,1,...] with m on the new layers
    and 1 on the others (scanned stack)."""
    layer, _ = _layer_leaf(path, model)
    if layer is not None:
        return m
    shape = (model.num_layers,) + (1,) * (len(x.shape) - 1)
    return jnp.where(jnp.asarray(new), m, 1.0).reshape(shape)


def _path_key(path) -> str:
    return ".".join(str(n) for n in _names(path) if n is not None)


def _new_mask(model: ModelConfig, new_layers) -> np.ndarray:
    new = np.zeros(model.num_layers, bool)
    new[list(new_layers)] = True
    return new


def scale_new_out_proj(params: Tree, model: ModelConfig, new_layers, m) -> Tree:
    """A params pure dict with the new layers' output projections multiplied by ``m``."""
    new = _new_mask(model, new_layers)

    def leaf(path, x):
        if not _is_faded(path, model, new):
            return x
        return x * jnp.asarray(_fade_mult(path, x, model, new, m), x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, params)


class FadeInState(NamedTuple):
    """``count``: grown-phase steps taken (the ramp's clock); ``latent``: the unmasked weights W
    of the faded leaves, by parameter path; ``inner``: the wrapped optimizer's state."""

    count: jax.Array
    latent: dict
    inner: Any


def fade_in_optimizer(inner: optax.GradientTransformation, model: ModelConfig, new_layers,
                      ramp_steps: int) -> optax.GradientTransformation:
    """``inner`` on the MSG reparameterisation P = m(t) W of the new layers' output projections
    (see above). ``init`` must see the unmasked W (``grow`` then stores m(0) W)."""
    new = _new_mask(model, new_layers)

    def init(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        latent = {_path_key(p): x for p, x in flat if _is_faded(p, model, new)}
        return FadeInState(jnp.zeros((), jnp.int32), latent, inner.init(params))

    def update(grads, state: FadeInState, params=None):
        if params is None:
            raise ValueError("fade_in_optimizer needs params in update()")
        m0 = fade_in_ramp(state.count, ramp_steps)
        m1 = fade_in_ramp(state.count + 1, ramp_steps)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = [_path_key(p) if _is_faded(p, model, new) else None for p, _ in flat]
        weights = [x if k is None else state.latent[k] for (_, x), k in zip(flat, keys)]
        grads_w = [g if k is None else g * _fade_mult(p, x, model, new, m0).astype(g.dtype)
                   for g, (p, x), k in zip(jax.tree.leaves(grads), flat, keys)]
        u, inner_state = inner.update(jax.tree.unflatten(treedef, grads_w), state.inner,
                                      jax.tree.unflatten(treedef, weights))
        out, latent = [], {}
        for (p, x), w, du, k in zip(flat, weights, jax.tree.leaves(u), keys):
            if k is None:
                out.append(du)
                continue
            latent[k] = w + du
            out.append(_fade_mult(p, x, model, new, m1).astype(x.dtype) * latent[k] - x)
        return jax.tree.unflatten(treedef, out), FadeInState(state.count + 1, latent, inner_state)

    return optax.GradientTransformation(init, update)


def with_fade_in(s: T.Setup, new_layers, ramp_steps: int) -> T.Setup:
    """``s`` with its optimizer wrapped by ``fade_in_optimizer``: state shapes and shardings
    extended (the latent weights shard like their parameters, the clock is replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec
    m = s.cfg.model
    new = _new_mask(m, new_layers)
    tx = fade_in_optimizer(s.tx, m, new_layers, ramp_steps)
    replicated = NamedSharding(s.mesh, PartitionSpec())

    def faded(tree) -> dict:
        return {_path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                if _is_faded(p, m, new)}

    opt_sh = FadeInState(replicated, faded(s.state_shardings.params), s.state_shardings.opt_state)
    abstract = FadeInState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                           faded(s.abstract_state.params), s.abstract_state.opt_state)
    return dataclasses.replace(
        s, tx=tx, state_shardings=dataclasses.replace(s.state_shardings, opt_state=opt_sh),
        abstract_state=dataclasses.replace(s.abstract_state, opt_state=abstract))


def source_model(dm: ModelConfig, op: str, factor: int) -> ModelConfig:
    """The source (small) model a growth op grows into ``dm``: depth ops divide num_layers by
    ``factor``; width ops divide d_ff / d_expert / shared width and the query heads per KV group.
    A dense model's MoE section is normalised to the default (so dense sources compare equal)."""
    if not dm.moe.enabled:
        dm = dataclasses.replace(dm, moe=type(dm.moe)())
    if op in ("stack", "zero_depth", "random_depth", "learn_depth"):
        if dm.num_layers % factor:
            raise ValueError(f"num_layers={dm.num_layers} is not divisible by factor={factor}")
        return dataclasses.replace(dm, num_layers=dm.num_layers // factor)
    if op in ("split", "zero_width", "random_width"):
        a, m = dm.attention, dm.moe
        heads = max(a.num_kv_heads, a.num_heads // factor)
        moe = dataclasses.replace(m, d_expert=max(1, m.d_expert // factor),
                                  d_shared=m.d_shared // factor) if m.enabled else m
        return dataclasses.replace(dm, d_ff=dm.d_ff // factor, moe=moe,
                                   attention=dataclasses.replace(a, num_heads=heads))
    return dm


def source_config(cfg: Config) -> Config:
    """The whole source run of ``cfg.growth``: the source model, ``growth.source_steps`` steps."""
    g = cfg.growth
    if g.op in DENSE_TO_MOE_OPS:
        from moejax.upcycle import dense_source
        model = dense_source(cfg.model, g.op)
    else:
        model = source_model(cfg.model, g.op, g.factor)
    train = dataclasses.replace(cfg.train, steps=g.source_steps,
                                warmup_steps=min(cfg.train.warmup_steps, g.source_steps))
    data = cfg.data
    if g.source_mixture:
        if len(g.source_mixture) != len(data.domains):
            raise ConfigError(f"growth.source_mixture={g.source_mixture}: give one weight per "
                              f"data.domains ({len(data.domains)}: {data.domains})")
        data = dataclasses.replace(data, mixture=tuple(g.source_mixture))
    return dataclasses.replace(cfg, model=model, data=data, train=train, growth=type(g)())
