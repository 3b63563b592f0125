"""Token sampling (greedy / temperature / top-k / top-p) and the one KV-cached decode core that both
``generate`` and the RL rollout engine (``moejax.rl.rollout``) compile: prefill, repeat the cache
per generation, then a ``lax.while_loop`` of one-token steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.mesh import constrain
from moejax.model import KVCache, constrain_kv, constrain_linear

ROUTING_KEY = "router/experts"  # model aux: [L_moe,B,T,k] int32 experts per token (-1 = none)
LOGPROB_MODES = ("policy", "sampling")


def truncation_mask(logits: jax.Array, top_k=0, top_p=1.0) -> jax.Array:
    """[B,V] bool: the top_k most likely tokens (0 = all), then within them (renormalised) the
    smallest most-probable set whose mass is >= top_p (crossing token kept; 1.0 keeps all).
    Ties are broken by token index; top_k and top_p may be traced."""
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)  # [B,V] descending
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    in_k = (jnp.arange(V) < top_k) | (top_k <= 0)  # [V]
    p = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)  # renormalised over the top k
    mass_before = jnp.cumsum(p, axis=-1) - p
    keep_sorted = in_k & ((mass_before < top_p) | (top_p >= 1.0))  # first token always kept
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)


def top_p_mask(probs: jax.Array, top_p) -> jax.Array:
    """[B,V] bool: the smallest most-probable set whose mass is >= top_p (crossing token kept)."""
    return truncation_mask(jnp.log(probs), 0, top_p)


def truncate(scaled: jax.Array, top_k, top_p) -> jax.Array:
    """scaled logits [B,V] with tokens outside the top-k/top-p set at -inf; skips the vocabulary
    sort (a ``lax.cond``) when both are off."""
    needed = (jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1.0)
    return jax.lax.cond(needed, lambda s: jnp.where(truncation_mask(s, top_k, top_p), s, -jnp.inf),
                        lambda s: s, scaled)


def sample_rows(logits: jax.Array, rng: jax.Array) -> jax.Array:
    """One categorical draw per row with key fold_in(rng, row): [B,V] -> [B] int32. Row b's draw
    depends only on (rng, b), so a batch sharded over devices samples what one device does."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def sample_with_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p, greedy):
    """logits [B,V] -> (tokens [B] int32, scaled [B,V], truncated [B,V]): temperature scales
    first, then top-k, then top-p truncate; ``greedy`` or temperature <= 0 gives the argmax.
    ``scaled``/``truncated`` are the full and the sampled-from distributions (as logits)."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    truncated = truncate(scaled, top_k, top_p)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample = sample_rows(truncated, rng)
    tokens = jnp.where((temperature > 0) & ~jnp.asarray(greedy), sample, best)
    return tokens, scaled, truncated


def sample_logits(logits: jax.Array, rng: jax.Array, temperature=1.0, top_p=1.0,
                  greedy: bool = False, top_k=0) -> jax.Array:
    """logits [B,V] -> tokens [B] int32 (see ``sample_with_logits``); knobs may be traced."""
    if greedy is True:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_with_logits(logits, rng, temperature, top_k, top_p, greedy)[0]


def chosen_logprobs(scaled: jax.Array, truncated: jax.Array, tokens: jax.Array, mode: str):
    """[B] f32 log-prob of ``tokens``: 'policy' = log_softmax(logits / T) (what a trainer
    recomputes), 'sampling' = under the truncated, renormalised distribution sampled from."""
    logits = scaled if mode == "policy" else truncated
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def make_knobs(temperature=1.0, top_p=1.0, top_k=0, greedy=False, eos_id=None) -> dict:
    """The traced sampling settings of ``decode`` (new values never recompile)."""
    return dict(temperature=jnp.asarray(temperature, jnp.float32),
                top_p=jnp.asarray(top_p, jnp.float32), top_k=jnp.asarray(top_k, jnp.int32),
                greedy=jnp.asarray(greedy, bool),
                eos_id=jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32))


def repeat_rows(cache: KVCache, times: int) -> KVCache:
    """Each row of the cache ``times`` times in a row (row b*times+g = row b), sharded like one."""
    rep = lambda x, axis: jnp.repeat(x, times, axis=axis)  # noqa: E731
    rows = lambda x: constrain(rep(x, 0), ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    kv = lambda x: constrain_kv(rep(x, 1 if x.ndim == 5 else 0))  # noqa: E731  stacked / per layer
    linear = None if cache.linear is None else tuple(  # Gated DeltaNet states (hybrid models)
        constrain_linear(jax.tree.map(lambda x: rep(x, 1 if c.conv_state.ndim == 4 else 0), c))
        for c in cache.linear)
    return KVCache(k=jax.tree.map(kv, cache.k), v=jax.tree.map(kv, cache.v),
                   positions=rows(cache.positions), segment_ids=rows(cache.segment_ids),
                   lengths=rows(cache.lengths), linear=linear)


def _rows(x: jax.Array) -> jax.Array:
    """Constrain a [B, ...] array to rows over the batch axes (no-op without a mesh)."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _routing_rows(r: jax.Array) -> jax.Array:
    """Constrain routing [L,B,T,k] to rows over the batch axes."""
    return constrain(r, (None, "batch", None, None))


def decode(graphdef, weights: tuple, prompt: jax.Array, lengths: jax.Array, rng: jax.Array,
           knobs: dict, *, num_generations: int, max_new_tokens: int, kv_len: int, pad_id: int,
           logprobs: str | None, record_routing: bool) -> dict:
    """The traced decode core (call inside jit): prompts [Bp,P] right-padded, row b valid in
    [:lengths[b]] (>= 1) -> a dict of B = Bp*G rows, row b*G+g = prompt b, generation g:

    ``tokens`` [B,P+N] (prompt, completion, pad_id), ``completion_lengths`` [B] (EOS included),
    ``finished`` [B] (ended with EOS); with ``logprobs`` ('policy'/'sampling') ``logprobs``
    [B,P+N-1] aligned with targets (t -> tokens[:, t+1]; 0 where not generated); with
    ``record_routing`` and an MoE model ``routing`` [L_moe,B,P+N,k] (the experts each fed token
    used; -1 where never fed). The Bp prompts are prefilled once and the cache repeated G times;
    each decode step feeds every row's last token, samples with key fold_in(rng, step), and a row
    stops at EOS or N new tokens; the loop exits when all rows are done. ``weights`` are the
    states ``nnx.merge(graphdef, *weights)`` takes; they ride in the loop carry (NNX transforms
    such as the layer scan refuse variables that are tracers of an enclosing trace level).
    """
    Bp, P = prompt.shape
    G, N = num_generations, max_new_tokens
    B, total = Bp * G, P + N
    model = nnx.merge(graphdef, *weights)
    seg = (jnp.arange(P)[None] < lengths[:, None]).astype(jnp.int32)  # [Bp,P]
    prompt = jnp.where(seg > 0, prompt, pad_id)
    logits, aux, cache = model(prompt, segment_ids=seg, cache=model.init_cache(Bp, kv_len))
    last = logits[jnp.arange(Bp), lengths - 1]  # [Bp,V]

    rows = jnp.arange(B)
    len_b = _rows(jnp.repeat(lengths, G))  # [B]
    carry = dict(
        cache=repeat_rows(cache, G),
        tokens=_rows(jnp.concatenate([jnp.repeat(prompt, G, axis=0),
                                      jnp.full((B, N), pad_id, jnp.int32)], axis=1)),
        count=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
        fed=jnp.zeros((B,), jnp.int32), weights=weights)
    if logprobs:
        carry["logprobs"] = _rows(jnp.zeros((B, total - 1), jnp.float32))
    if record_routing and ROUTING_KEY in aux:
        r = jnp.where(seg[None, :, :, None] > 0, aux[ROUTING_KEY].astype(jnp.int32), -1)
        r = jnp.pad(r, ((0, 0), (0, 0), (0, N), (0, 0)), constant_values=-1)  # [L,Bp,P+N,k]
        carry["routing"] = _routing_rows(jnp.repeat(r, G, axis=1))

    def emit(i, logits, c):
        """Sample token i of every still-active row from its logits [B,V] and write it."""
        tok, scaled, truncated = sample_with_logits(
            logits, jax.random.fold_in(rng, i), knobs["temperature"], knobs["top_k"],
            knobs["top_p"], knobs["greedy"])
        active = ~c["done"]
        col = jnp.where(active, len_b + i, total)  # out of range (dropped) once a row is done
        c = dict(c, tokens=c["tokens"].at[rows, col].set(tok, mode="drop"),
                 count=c["count"] + active, done=c["done"] | (active & (tok == knobs["eos_id"])),
                 fed=jnp.where(active, tok, pad_id))
        if logprobs:
            lp = chosen_logprobs(scaled, truncated, tok, logprobs)
            c["logprobs"] = c["logprobs"].at[rows, col - 1].set(lp, mode="drop")
        return c

    def cond(loop):
        i, c = loop
        return (i < N) & ~jnp.all(c["done"])

    def body(loop):
        i, c = loop
        logits, aux, cache = nnx.merge(graphdef, *c["weights"])(c["fed"][:, None], cache=c["cache"])
        c = dict(c, cache=cache)
        if "routing" in c:  # the fed token sits at column len_b + i - 1
            col = jnp.where(~c["done"], len_b + i - 1, total)
            step = aux[ROUTING_KEY][:, :, 0].astype(jnp.int32)  # [L,B,k]
            c["routing"] = c["routing"].at[:, rows, col].set(step, mode="drop")
        return i + 1, emit(i, logits[:, 0], c)

    first = emit(0, _rows(jnp.repeat(last, G, axis=0)), carry)  # token 0 from the prefill logits
    _, c = jax.lax.while_loop(cond, body, (jnp.int32(1), first))
    out = {"tokens": c["tokens"], "completion_lengths": c["count"], "finished": c["done"]}
    for key in ("logprobs", "routing"):
        if key in c:
            out[key] = c[key]
    return out


def generate(model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, max_new_tokens: int, *,
             rng: jax.Array, temperature=1.0, top_p=1.0, top_k=0, greedy: bool = False,
             eos_id: int | None = None, pad_id: int = 0) -> jax.Array:
    """Continue right-padded prompts; returns tokens [B, P+max_new_tokens].

    prompt_tokens [B,P] with row b valid in [:prompt_lengths[b]] (>= 1). Row b of the result holds
    its prompt, then its generated tokens starting at column prompt_lengths[b], then pad_id. A row
    stops after emitting eos_id (pad_id afterwards); the loop exits when all rows are done.
    One jit of ``decode`` (one generation per prompt); knob values and seeds never recompile.
    """
    graphdef, state = nnx.split(model)
    knobs = make_knobs(temperature, top_p, top_k, greedy, eos_id)
    return _generate(graphdef, state, jnp.asarray(prompt_tokens, jnp.int32),
                     jnp.asarray(prompt_lengths, jnp.int32), rng, knobs,
                     max_new_tokens=int(max_new_tokens), pad_id=int(pad_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id"))
def _generate(graphdef, state, prompt, lengths, rng, knobs, *, max_new_tokens, pad_id):
    """Sampling knobs are traced (no recompile per value); shapes, graph and pad_id are static."""
    out = decode(graphdef, (state,), prompt, lengths, rng, knobs, num_generations=1,
                 max_new_tokens=max_new_tokens, kv_len=prompt.shape[1] + max_new_tokens,
                 pad_id=pad_id, logprobs=None, record_routing=False)
    return out["tokens"]
