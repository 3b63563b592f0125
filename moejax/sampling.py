"""Token sampling (greedy / temperature / top-p) and KV-cached generation with one compiled loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def top_p_mask(probs: jax.Array, top_p) -> jax.Array:
    """[B,V] bool: the smallest most-probable set whose mass is >= top_p (crossing token kept)."""
    order = jnp.argsort(-probs, axis=-1)  # [B,V] descending
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = (mass_before < top_p) | (top_p >= 1.0)  # first token always kept; 1.0 keeps all
    rows = jnp.arange(probs.shape[0])[:, None]
    return jnp.zeros(probs.shape, bool).at[rows, order].set(keep_sorted)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature=1.0, top_p=1.0,
                  greedy: bool = False) -> jax.Array:
    """logits [B,V] -> tokens [B] int32. Temperature scales first, then top-p truncates.

    ``greedy`` or ``temperature <= 0`` gives the argmax; greedy, temperature and top_p may be traced.
    """
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy is True:
        return best
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    keep = top_p_mask(jax.nn.softmax(scaled, axis=-1), top_p)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    sample = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where((temperature > 0) & ~jnp.asarray(greedy), sample, best)


def generate(model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, max_new_tokens: int, *,
             rng: jax.Array, temperature=1.0, top_p=1.0, greedy: bool = False,
             eos_id: int | None = None, pad_id: int = 0) -> jax.Array:
    """Continue right-padded prompts; returns tokens [B, P+max_new_tokens].

    prompt_tokens [B,P] with row b valid in [:prompt_lengths[b]] (>= 1). Row b of the result holds
    its prompt, then its generated tokens starting at column prompt_lengths[b], then pad_id. A row
    stops after emitting eos_id (pad_id afterwards); the loop exits when all rows are done.
    One jit: cache init + prefill + a ``lax.while_loop`` of one-token steps (no per-token retrace).
    """
    graphdef, state = nnx.split(model)
    knobs = dict(temperature=jnp.asarray(temperature, jnp.float32),
                 top_p=jnp.asarray(top_p, jnp.float32), greedy=jnp.asarray(greedy, bool),
                 eos_id=jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32))
    return _generate(graphdef, state, jnp.asarray(prompt_tokens, jnp.int32),
                     jnp.asarray(prompt_lengths, jnp.int32), rng, knobs,
                     max_new_tokens=int(max_new_tokens), pad_id=int(pad_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id"))
def _generate(graphdef, state, prompt, lengths, rng, knobs, *, max_new_tokens, pad_id):
    """Sampling knobs are traced (no recompile per value); shapes, graph and pad_id are static."""
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    total = P + max_new_tokens
    rows = jnp.arange(B)
    t = jnp.arange(P, dtype=jnp.int32)[None]
    seg = (t < lengths[:, None]).astype(jnp.int32)  # [B,P]
    out = jnp.where(seg > 0, prompt, pad_id)
    out = jnp.concatenate([out, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], axis=1)

    cache = model.init_cache(B, total)
    logits, _, cache = model(prompt, segment_ids=seg, cache=cache)  # prefill
    last = logits[rows, lengths - 1]  # [B,V]

    def emit(i, last, rng, out, done):
        tok = sample_logits(last, jax.random.fold_in(rng, i), knobs["temperature"], knobs["top_p"],
                            knobs["greedy"])
        tok = jnp.where(done, pad_id, tok)
        out = out.at[rows, lengths + i].set(tok)
        done = done | (tok == knobs["eos_id"])
        return tok, out, done

    tok, out, done = emit(0, last, rng, out, jnp.zeros((B,), bool))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, state = carry
        # params ride in the carry (unchanged): NNX transforms such as the layer scan refuse
        # variables whose values are tracers of the enclosing jit level
        logits, _, cache = nnx.merge(graphdef, state)(tok[:, None], cache=cache)  # [B,1,V]
        tok, out, done = emit(i, logits[:, 0], rng, out, done)
        return i + 1, tok, cache, out, done, state

    _, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, out, done, state))
    return out
