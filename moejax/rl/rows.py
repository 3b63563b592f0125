"""Host rollout rows (numpy) and the policy programs' batch built from them, placed on the mesh:
what the RL loop hands between sampling, rewards and the update (``moejax.rl.trainer``)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from moejax import train as T


def to_global(mesh, x: np.ndarray) -> jax.Array:
    """A host array held whole by every process -> a global array with rows over the batch axes."""
    sharding = T.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def routing_disagreement(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per layer, the share of valid tokens whose expert *sets* differ: a, b [B, L, T, k], valid
    [B, T] -> [L]."""
    diff = np.any(np.sort(a, -1) != np.sort(b, -1), axis=-1)  # [B, L, T]
    v = valid[:, None, :]
    return (diff & v).sum((0, 2)) / max(int(valid.sum()), 1)


@dataclasses.dataclass
class Rollouts:
    """Host copies of rollout rows (numpy), concatenable and selectable by row."""

    tokens: np.ndarray  # [B, S]
    prompt_lengths: np.ndarray  # [B]
    completion_lengths: np.ndarray  # [B]
    finished: np.ndarray  # [B]
    completion_mask: np.ndarray  # [B, S-1]
    logprobs: np.ndarray  # [B, S-1]
    routing: np.ndarray | None  # [B, L, S, k]
    routing_valid: np.ndarray | None  # [B, S]: the token at t was fed (its routing recorded)
    rewards: np.ndarray  # [B]
    correct: np.ndarray  # [B]
    tiers: list  # [B]
    items: list = dataclasses.field(default_factory=list)  # [B] the TaskItem of each row
    group: np.ndarray | None = None  # [B] dense prompt index within the step (advantage groups)
    prefix_mask: np.ndarray | None = None  # [B, S-1] Prefix-RFT: response tokens from a demo
    uid: np.ndarray | None = None  # [B] Prefix-RFT variant uid (prefix.ON_POLICY_UID on-policy)

    def select(self, rows) -> "Rollouts":
        rows = np.asarray(rows)

        def pick(x):
            if isinstance(x, list):
                return [x[i] for i in rows]
            return None if x is None else x[rows]
        return Rollouts(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        def cat(name):
            vals = [getattr(p, name) for p in parts]
            if isinstance(vals[0], list):
                return [t for v in vals for t in v]
            return None if vals[0] is None else np.concatenate(vals)
        return Rollouts(**{f.name: cat(f.name) for f in dataclasses.fields(Rollouts)})


def rl_batch(r: Rollouts, advantages: np.ndarray, old_logprobs: np.ndarray,
             ref_logprobs: np.ndarray | None, forced: np.ndarray | None,
             entropy_mask_ratio: float = 0.0) -> dict[str, np.ndarray]:
    """The policy programs' rows (``moejax.rl.policy`` docstring) from rollouts and advantages
    (sequence [B] or token level [B, S-1]); Prefix-RFT rows add ``prefix_mask`` and the step's
    ``entropy_mask_ratio``."""
    S = r.tokens.shape[1]
    t = np.arange(S - 1)[None, :]
    filled = (r.prompt_lengths + r.completion_lengths)[:, None]
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    out = {"inputs": r.tokens[:, :-1], "targets": r.tokens[:, 1:],
           "positions": np.broadcast_to(t, (len(r.tokens), S - 1)).astype(np.int32),
           "segment_ids": (t < filled).astype(np.int32),
           "completion_mask": r.completion_mask.astype(np.float32),
           "advantages": (adv * r.completion_mask).astype(np.float32),
           "old_logprobs": old_logprobs.astype(np.float32),
           "rollout_logprobs": r.logprobs.astype(np.float32)}
    if ref_logprobs is not None:
        out["ref_logprobs"] = ref_logprobs.astype(np.float32)
    if forced is not None:
        out["forced_experts"] = forced[:, :, :S - 1].astype(np.int32)
    if r.prefix_mask is not None:
        out["prefix_mask"] = r.prefix_mask.astype(np.float32)
        out["entropy_mask_ratio"] = np.full(len(r.tokens), entropy_mask_ratio, np.float32)
    return out


def length_correlation(lengths, values) -> float:
    """Pearson correlation of rewards with response length (0 when either is constant)."""
    x, y = np.asarray(lengths, np.float64), np.asarray(values, np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])
