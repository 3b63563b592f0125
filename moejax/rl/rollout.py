"""The rollout engine: G sampled completions per prompt as one compiled program per shape bucket
(prefill once, repeat the cache G times, a ``lax.while_loop`` of one-token decode steps that stops
per row at EOS or ``max_new_tokens``), with per-token logprobs and the MoE routing each token used.

Layout of a ``RolloutResult`` (B = prompts x G rows, row b*G+g = prompt b, generation g; P =
``max_prompt_len``, N = ``max_new_tokens``): ``tokens`` [B,P+N] hold the prompt at [0:len_b], the
completion right after it (EOS kept), then pad. Per-target fields [B,P+N-1] are aligned with
``tokens[:, 1:]`` so a trainer uses inputs = tokens[:, :-1], targets = tokens[:, 1:].
The decode core is ``moejax.sampling.decode`` (``moejax.sampling.generate`` runs the same one).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config_checks import ConfigError, _check_choice, _fail
from moejax.mesh import BATCH_AXES, rules_for
from moejax.sampling import LOGPROB_MODES, decode, make_knobs
from moejax.train import Setup


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Shape buckets and sampling of the rollout engine (``rl.rollout``)."""

    max_prompt_len: int = 64  # P: prompts are right-padded to it (one compile per bucket)
    max_new_tokens: int = 64  # N: completion length cap (EOS included)
    kv_len: int = 0  # KV-cache slots per row; 0 = max_prompt_len + max_new_tokens
    temperature: float = 1.0  # > 0; greedy decoding is a call argument of generate()
    top_p: float = 1.0  # nucleus mass kept (1.0 = off), applied after top-k
    top_k: int = 0  # most likely tokens kept (0 = off), applied after the temperature
    # 'policy': log_softmax(logits / temperature) of the sampled token (what the trainer
    # recomputes); 'sampling': under the truncated, renormalised top-k/top-p distribution
    logprobs: str = "policy"
    record_routing: bool = True  # MoE: the experts every fed token used (for R3 replay)

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                _fail(f"rl.rollout.{name}", getattr(self, name), "must be >= 1")
        need = self.max_prompt_len + self.max_new_tokens
        if self.kv_len < 0 or 0 < self.kv_len < need:
            _fail("rl.rollout.kv_len", self.kv_len,
                  f"a KV bucket smaller than prompt + max new tokens (max_prompt_len + "
                  f"max_new_tokens = {need}); use >= {need} or 0 for exactly that")
        if not self.temperature > 0:
            _fail("rl.rollout.temperature", self.temperature,
                  "must be > 0 (greedy decoding is generate(..., greedy=True))")
        if not 0 < self.top_p <= 1:
            _fail("rl.rollout.top_p", self.top_p, "must be in (0, 1] (1.0 = off)")
        if self.top_k < 0:
            _fail("rl.rollout.top_k", self.top_k, "must be >= 0 (0 = off)")
        _check_choice("rl.rollout.logprobs", self.logprobs, LOGPROB_MODES)

    @property
    def cache_len(self) -> int:
        """KV-cache slots per row (the kv_len bucket)."""
        return self.kv_len or self.max_prompt_len + self.max_new_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutResult:
    """B generated rows (see the module docstring); ``numpy()`` brings it to the host."""

    tokens: jax.Array  # [B,P+N] int32
    prompt_lengths: jax.Array  # [B] int32
    completion_lengths: jax.Array  # [B] int32, EOS included
    finished: jax.Array  # [B] bool, ended with EOS
    completion_mask: jax.Array  # [B,P+N-1] bool: tokens[:, t+1] was generated
    logprobs: jax.Array  # [B,P+N-1] f32 of tokens[:, t+1] (0 where not generated)
    routing: jax.Array | None  # [L_moe,B,P+N,k] int32 experts each input position used; -1 = none
    routing_valid: jax.Array | None  # [B,P+N] bool: the token at t was fed to the model

    def numpy(self) -> RolloutResult:
        return jax.tree.map(np.asarray, jax.device_get(self))

    def first_rows(self, n: int) -> RolloutResult:
        """The first n rows (routing's rows are its axis 1)."""
        def cut(name):
            x = getattr(self, name)
            axis = 1 if name == "routing" else 0
            return None if x is None else jax.lax.slice_in_dim(x, 0, n, axis=axis)
        return RolloutResult(**{f.name: cut(f.name) for f in dataclasses.fields(self)})


def result_masks(prompt_lengths, completion_lengths, total: int) -> tuple:
    """(completion_mask [B,total-1], routing_valid [B,total]) from the per-row lengths: targets
    t in [len-1, len-1+n) were generated; inputs t < len + n - 1 were fed (the last one never)."""
    t = jnp.arange(total)[None]
    start, n = prompt_lengths[:, None], completion_lengths[:, None]
    completion = (t[:, :-1] >= start - 1) & (t[:, :-1] < start - 1 + n)
    return completion, t < start + n - 1


class RolloutEngine:
    """``generate(weights, prompt_tokens, prompt_lengths, *, num_generations, rng, greedy)``
    -> ``RolloutResult`` on one device or sharded on ``mesh`` (rows data-parallel over the batch
    axes, experts over ``expert``: the model's own layout under the logical ``rules``).

    Built from a ``moejax.train.Setup`` (its graph, mesh and rules; ``weights`` =
    ``(state.params, state.rest)`` of its train state, sharded as they are) or from a graphdef
    (``weights`` = the states ``nnx.merge(graphdef, *weights)`` takes) with an optional mesh.
    ``compiles`` counts traces: one per (prompts, G, P, N, kv_len) bucket."""

    def __init__(self, model: nnx.GraphDef | Setup, cfg: RolloutConfig, *, eos_id: int,
                 pad_id: int, mesh: Mesh | None = None, rules=None):
        if isinstance(model, Setup):
            model, mesh, rules = model.graphdef, model.mesh, rules_for(model.cfg.mesh)
        self.graphdef, self.cfg = model, cfg
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.mesh, self.rules = mesh, rules
        self.compiles = 0
        self._program = jax.jit(self._trace, static_argnames=("num_generations",))

    def generate(self, weights: tuple, prompt_tokens, prompt_lengths, *, num_generations: int,
                 rng: jax.Array, greedy: bool = False) -> RolloutResult:
        """prompt_tokens [Bp,P'] int (P' <= max_prompt_len, right-padded; row b valid in
        [:prompt_lengths[b]], >= 1) -> B = Bp*G rows. Knob values, seeds, prompts and lengths
        reuse the bucket's program; ``greedy`` (argmax; logprobs as configured) does too. On a
        mesh whose batch shards do not divide B, dummy prompts fill the last shard (and are
        cut from the result)."""
        if not isinstance(weights, (tuple, list)):
            raise TypeError("weights must be a tuple of states, e.g. (state.params, state.rest)")
        prompt, lengths = self._pad_prompts(prompt_tokens, prompt_lengths)
        if num_generations < 1:
            raise ValueError(f"num_generations={num_generations} must be >= 1")
        Bp = prompt.shape[0]
        prompt, lengths = self._fill_shards(prompt, lengths, num_generations)
        c = self.cfg
        knobs = make_knobs(c.temperature, c.top_p, c.top_k, greedy, self.eos_id)
        prompt, lengths, rng, knobs = self._replicate((prompt, lengths, rng, knobs))
        out = self._program(tuple(weights), prompt, lengths, rng, knobs,
                            num_generations=int(num_generations))
        if prompt.shape[0] == Bp:
            return out
        return out.first_rows(Bp * num_generations)

    def _pad_prompts(self, prompt_tokens, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
        """Host-side checks, then right-pad the prompts to the max_prompt_len bucket."""
        prompt = np.asarray(prompt_tokens, np.int32)
        lengths = np.asarray(prompt_lengths, np.int32)
        bucket = self.cfg.max_prompt_len
        if prompt.ndim != 2 or lengths.shape != prompt.shape[:1]:
            raise ValueError(f"prompt_tokens {prompt.shape} must be [Bp, P'] and prompt_lengths "
                             f"{lengths.shape} [Bp]")
        if prompt.shape[1] > bucket:
            raise ConfigError(f"rl.rollout.max_prompt_len={bucket} is smaller than the prompts' width "
                              f"{prompt.shape[1]}; raise it or shorten the prompts")
        if lengths.size and not (1 <= lengths.min() and lengths.max() <= prompt.shape[1]):
            raise ValueError(f"prompt_lengths must be in [1, {prompt.shape[1]}], got "
                             f"[{lengths.min()}, {lengths.max()}]")
        return np.pad(prompt, ((0, 0), (0, bucket - prompt.shape[1])),
                      constant_values=self.pad_id), lengths

    def _fill_shards(self, prompt: np.ndarray, lengths: np.ndarray, G: int) -> tuple:
        """Append dummy one-token prompts until Bp*G rows divide over the mesh's batch shards."""
        if self.mesh is None:
            return prompt, lengths
        shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES if a in self.mesh.shape]))
        Bp = prompt.shape[0]
        while (Bp * G) % shards:
            Bp += 1
        extra = Bp - prompt.shape[0]
        return (np.pad(prompt, ((0, extra), (0, 0)), constant_values=self.pad_id),
                np.pad(lengths, (0, extra), constant_values=1))

    def _replicate(self, tree):
        """Host inputs replicated on the mesh (the program shards the rows itself)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    @contextlib.contextmanager
    def _tracing(self):
        """The mesh (abstract) and logical rules while tracing, as ``moejax.train.tracing_mesh``:
        without them MoE layers take the single-device path and ``constrain`` is a no-op."""
        if self.mesh is None:
            yield
            return
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
                nnx.logical_axis_rules(self.rules):
            yield

    def _trace(self, weights, prompt, lengths, rng, knobs, *, num_generations):
        self.compiles += 1  # runs once per trace, i.e. per compiled shape bucket
        c = self.cfg
        with self._tracing():
            out = decode(self.graphdef, weights, prompt, lengths, rng, knobs,
                         num_generations=num_generations, max_new_tokens=c.max_new_tokens,
                         kv_len=c.cache_len, pad_id=self.pad_id, logprobs=c.logprobs,
                         record_routing=c.record_routing)
            prompt_lengths = jnp.repeat(lengths, num_generations)
            completion_mask, fed = result_masks(prompt_lengths, out["completion_lengths"],
                                                out["tokens"].shape[1])
            routing = out.get("routing")
            return RolloutResult(
                tokens=out["tokens"], prompt_lengths=prompt_lengths,
                completion_lengths=out["completion_lengths"], finished=out["finished"],
                completion_mask=completion_mask, logprobs=out["logprobs"], routing=routing,
                routing_valid=None if routing is None else fed)
