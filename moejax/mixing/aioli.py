"""Aioli (Chen, Hu, Lourie, Cho, Re; ICLR 2025; HazyResearch/aioli ``trainer/aioli_trainer.py``):
online mixing under the linear dynamic law ``L_{t+1} = L_t - A p`` (A[i, j]: how training on
domain j lowers domain i's loss), in one run.

Every round of ``update_steps`` steps:
1. LearnParams (the round's first ``lp_rounds * lp_steps * k`` steps, which count as training
   steps): for each of ``lp_rounds`` random orders over the k domains, train ``lp_steps`` steps on
   the perturbed mixture ``W[j]`` (``one_hot_factor`` on domain j, the rest spread uniformly) and
   add the drop of every domain's validation loss to column j of A~.
2. Un-mix: A~ = A W^T (column j saw mixture W[j]), so A = A~ W^-T; averaged over the orders and
   divided by ``lp_steps``, A is the per-step effect.
3. Normalise (shift so the minimum is >= 0, divide by the sum) and EMA it (``ema``: the weight
   kept from the previous rounds' estimate, as the reference code).
4. ``p ∝ exp(eta * sum_i A[i, j])``, trained on for the rest of the round.

The math is pure functions (tested against numpy by hand); ``AioliMixer`` runs the schedule as
a ``moejax.data.mixture.Mixer``. The round's domain orders come from ``(seed, round)``, so the
state needs no RNG and a resume anywhere in a round continues with the same orders and weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from moejax.config_checks import _check_positive, _fail
from moejax.mixing import check_domains, weights_by_name


@dataclasses.dataclass(frozen=True)
class AioliConfig:
    """Aioli's knobs (defaults: the paper's and HazyResearch/aioli scripts/full/aioli/run.sh)."""

    update_steps: int = 200  # steps per round, LearnParams included
    lp_rounds: int = 2  # random orders over the domains per LearnParams
    lp_steps: int = 10  # steps on each perturbed mixture
    one_hot_factor: float = 0.75  # the perturbed domain's weight (the rest share 1 - this)
    ema: float = 0.1  # weight kept from the previous rounds' normalised A (0: no smoothing)
    eta: float = 1.0  # step size of the exponentiated update
    seed: int = 0  # the LearnParams orders: one permutation stream per (seed, round)

    def __post_init__(self):
        for name in ("update_steps", "lp_rounds", "lp_steps", "eta"):
            _check_positive(f"aioli.{name}", getattr(self, name))
        if not 0.0 < self.one_hot_factor <= 1.0:
            _fail("aioli.one_hot_factor", self.one_hot_factor, "must lie in (0, 1]")
        if not 0.0 <= self.ema < 1.0:
            _fail("aioli.ema", self.ema, "must lie in [0, 1) (0 disables smoothing)")

    def learn_steps(self, k: int) -> int:
        """Steps of LearnParams in a round over ``k`` domains."""
        return self.lp_rounds * self.lp_steps * k

    def check_domains(self, k: int) -> None:
        """The cross-field checks that need the domain count ``k``."""
        if not self.one_hot_factor > 1.0 / k:
            _fail("aioli.one_hot_factor", self.one_hot_factor,
                  f"must exceed 1/k = {1.0 / k:.4g} for {k} domains (else the perturbed "
                  "mixtures are all uniform and A cannot be un-mixed)")
        if not self.update_steps > self.learn_steps(k):
            _fail("aioli.update_steps", self.update_steps,
                  f"must exceed LearnParams' lp_rounds * lp_steps * k = {self.learn_steps(k)} "
                  f"steps for {k} domains (raise it or lower aioli.lp_steps / aioli.lp_rounds)")


# -- the math -----------------------------------------------------------------------------------
def perturbation_matrix(k: int, one_hot_factor: float) -> np.ndarray:
    """W [k, k]: row j is LearnParams' mixture for domain j (``one_hot_factor`` on j, the rest
    ``(1 - one_hot_factor) / (k - 1)`` each)."""
    W = np.full((k, k), (1.0 - one_hot_factor) / (k - 1))
    np.fill_diagonal(W, one_hot_factor)
    return W


def unmix(tilde: np.ndarray, W: np.ndarray) -> np.ndarray:
    """A with ``tilde = A @ W.T`` (column j of ``tilde`` measured under mixture ``W[j]``)."""
    return np.linalg.solve(W, tilde.T).T


def normalise(A: np.ndarray) -> np.ndarray:
    """Shift so the minimum entry is >= 0, then divide by the sum (all zeros stay zeros)."""
    A = np.asarray(A, np.float64)
    A = A - min(A.min(), 0.0)
    total = A.sum()
    return A / total if total > 0 else A


def ema_update(previous: np.ndarray | None, new: np.ndarray, ema: float) -> np.ndarray:
    """``(1 - ema) * new + ema * previous`` (the first estimate is taken as it is)."""
    return new if previous is None else (1.0 - ema) * new + ema * previous


def exp_update(A: np.ndarray, eta: float) -> np.ndarray:
    """Mixture p ∝ exp(eta * sum_i A[i, j]) (from uniform, as the reference with EMA)."""
    z = eta * np.asarray(A, np.float64).sum(axis=0)
    p = np.exp(z - z.max())
    return p / p.sum()


def learn_order(k: int, lp_rounds: int, seed: int, round_index: int) -> np.ndarray:
    """The LearnParams domain order of one round: ``lp_rounds`` random permutations of k,
    concatenated [lp_rounds * k]; a pure function of (seed, round)."""
    rng = np.random.default_rng((seed, round_index))
    return np.concatenate([rng.permutation(k) for _ in range(lp_rounds)])


# -- the mixer ----------------------------------------------------------------------------------
class AioliMixer:
    """Aioli as a ``Trainer`` mixer. ``eval_losses(trainer) -> {domain: validation loss}`` is
    called at every LearnParams boundary (``lp_rounds * k + 1`` times a round; the experiment
    wires it to a small fixed held-out batch per domain). Weights returned by
    ``before_step(trainer, s)`` are meant for the batches from step s + 1 on."""

    def __init__(self, domains: Sequence[str], eval_losses: Callable[[Any], dict[str, float]],
                 cfg: AioliConfig = AioliConfig()):
        self.domains = check_domains(domains, minimum=2)
        cfg.check_domains(len(self.domains))
        self.cfg, self.eval_losses = cfg, eval_losses
        self.W = perturbation_matrix(len(self.domains), cfg.one_hot_factor)
        k = len(self.domains)
        self.tilde = np.zeros((k, k))  # this round's summed loss drops, column = perturbed domain
        self.previous: np.ndarray | None = None  # losses at the last LearnParams boundary [k]
        self.A: np.ndarray | None = None  # the last un-mixed per-step A (before normalising)
        self.A_ema: np.ndarray | None = None  # the smoothed normalised A the weights come from
        self.weights: np.ndarray | None = None  # the last exponentiated-update mixture [k]
        self.rounds_done = 0

    def _losses(self, trainer) -> np.ndarray:
        got = self.eval_losses(trainer)
        missing = [d for d in self.domains if d not in got]
        if missing:
            raise KeyError(f"eval_losses returned no loss for domain(s) {missing}")
        return np.array([got[d] for d in self.domains], np.float64)

    def before_step(self, trainer, step: int) -> dict[str, float] | None:
        """At every LearnParams boundary: measure, record the last segment's drop, and return
        the next perturbed mixture; at the end of LearnParams return the updated mixture."""
        cfg, k = self.cfg, len(self.domains)
        round_index, offset = divmod(step, cfg.update_steps)
        learn = cfg.learn_steps(k)
        if offset > learn or offset % cfg.lp_steps:
            return None
        order = learn_order(k, cfg.lp_rounds, cfg.seed, round_index)
        losses = self._losses(trainer)
        if offset == 0:
            self.tilde = np.zeros((k, k))
        else:  # the segment that just ended trained on W[order[segment - 1]]
            self.tilde[:, order[offset // cfg.lp_steps - 1]] += self.previous - losses
        self.previous = losses
        if offset < learn:
            return weights_by_name(self.domains, self.W[order[offset // cfg.lp_steps]])
        return weights_by_name(self.domains, self._update())

    def _update(self) -> np.ndarray:
        """Un-mix, normalise, EMA and exponentiate: the mixture for the rest of the round."""
        cfg = self.cfg
        self.A = unmix(self.tilde / (cfg.lp_rounds * cfg.lp_steps), self.W)
        self.A_ema = ema_update(self.A_ema, normalise(self.A), cfg.ema)
        self.weights = exp_update(self.A_ema, cfg.eta)
        self.rounds_done += 1
        return self.weights

    def state(self) -> dict:
        """JSON-able: every array as nested lists of floats (exact through JSON)."""
        lists = lambda a: None if a is None else np.asarray(a, np.float64).tolist()  # noqa: E731
        return {"domains": list(self.domains), "tilde": lists(self.tilde),
                "previous": lists(self.previous), "A": lists(self.A),
                "A_ema": lists(self.A_ema), "weights": lists(self.weights),
                "rounds_done": self.rounds_done}

    def load_state(self, state: dict) -> None:
        if list(state["domains"]) != list(self.domains):
            raise ValueError(f"Aioli state over domains {state['domains']} cannot resume a run "
                             f"over {list(self.domains)}")
        arrays = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
        self.tilde = arrays(state["tilde"])
        self.previous, self.A = arrays(state["previous"]), arrays(state["A"])
        self.A_ema, self.weights = arrays(state["A_ema"]), arrays(state["weights"])
        self.rounds_done = int(state["rounds_done"])
