"""One arm of a data-mixing experiment: ``run_mixing_arm(cfg, workdir) -> summary``.

Every arm trains ``train.steps`` steps on the training domains (``data.domains`` minus
``mixing.target_domain``, which keeps weight 0), so arms compare at matched tokens:

- natural: the corpus's training-token shares (or ``mixing.natural``), static;
- uniform: equal weights, static;
- aioli / dga: uniform to start, then the online mixer (``moejax.mixing.aioli`` / ``dga``) wired
  to small fixed batches per domain: Aioli measures losses on held-out batches with the trainer's
  compiled eval step (one program, not ``trainer.evaluate``); DGA takes per-domain gradients on
  training-split windows drawn as a function of the step (so a resumed run sees the same ones)
  and the target's gradient on the target domain's training split;
- regmix: a resumable sweep of proxy runs (ordinary ``Trainer`` runs at proxy size on fixed
  sampled mixtures, ``regmix.run_sweep``) in ``<experiment workdir>/_regmix-<hash>`` (shared by
  every arm with the same proxy settings), the regressor fit on ``num_proxies`` of them and
  scored (Spearman) on ``held_out``, optional larger runs for rank invariance, then the top-k
  average of the candidates and the target run on that static mixture.

The mixer's state lives in the data iterator's checkpoint item (``moejax.data.mixture``), so an
interrupted arm resumes with the same weights, RNG and data order; an interrupted sweep resumes at
the unfinished proxy (which resumes from its own checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from moejax import train as T
from moejax.data.mixture import DomainStream
from moejax.data.pipeline import make_row
from moejax.metrics import read_metrics
from moejax.mixing import aioli, dga, regmix, weights_by_name
from moejax.mixing.config import MEAN_METRIC, MixingConfig, MixRunConfig, RegMixConfig
from moejax.paths import as_path, write_text_atomic
from moejax.trainer import Trainer

OnStep = Callable[[Trainer, int, dict], None] | None
SWEEP_FILE, LARGER_FILE, FIT_FILE = "sweep.json", "larger.json", "fit.json"
# RegMix fields that decide which runs the sweep trains (the rest only change the fit/choice)
SWEEP_FIELDS = ("num_proxies", "held_out", "proxy_steps", "proxy_num_layers", "proxy_d_model",
                "num_larger", "larger_num_layers", "larger_d_model", "seed")


class SweepInterrupted(RuntimeError):
    """A proxy run stopped on a signal (its checkpoint is saved; rerunning resumes it)."""


# -- weights ------------------------------------------------------------------------------------
def natural_shares(cfg: MixRunConfig, data) -> dict[str, float]:
    """The natural distribution over the training domains: ``mixing.natural`` or the corpus's
    training-token shares, normalised."""
    train = cfg.training_domains
    if cfg.mixing.natural:
        given = dict(zip(cfg.data.domains, cfg.mixing.natural))
        w = np.array([given[d] for d in train], np.float64)
    else:
        w = np.array([data.num_tokens(d, "train") for d in train], np.float64)
    return weights_by_name(train, w / w.sum())


def full_weights(cfg: MixRunConfig, weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` over the training domains completed to every ``data.domains`` entry (the
    target and any domain not given: 0)."""
    return {d: float(weights.get(d, 0.0)) for d in cfg.data.domains}


def with_mixture(cfg: MixRunConfig, weights: Mapping[str, float]) -> MixRunConfig:
    """``cfg`` training on ``weights`` (``data.mixture`` over ``data.domains``, target 0)."""
    full = full_weights(cfg, weights)
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, mixture=tuple(full[d] for d in cfg.data.domains)))


def uniform(cfg: MixRunConfig) -> dict[str, float]:
    k = len(cfg.training_domains)
    return {d: 1.0 / k for d in cfg.training_domains}


# -- mixers -------------------------------------------------------------------------------------
class TargetZero:
    """A mixer over the training domains whose weights are completed with 0 for the other
    ``data.domains`` (the target); its state is the inner mixer's."""

    def __init__(self, inner, domains: tuple[str, ...]):
        self.inner, self.domains = inner, domains

    def before_step(self, trainer, step: int) -> dict[str, float] | None:
        w = self.inner.before_step(trainer, step)
        return None if w is None else {d: float(w.get(d, 0.0)) for d in self.domains}

    def state(self) -> Any:
        return self.inner.state()

    def load_state(self, state: Any) -> None:
        self.inner.load_state(state)


def mixer_batch_size(cfg: MixRunConfig) -> int:
    return cfg.mixing.eval_batch_size or cfg.train.batch_size


class HeldOutLosses:
    """Aioli's ``eval_losses(trainer)``: each training domain's loss on ``mixing.eval_batches``
    fixed held-out batches, through the trainer's compiled eval step (built once per run)."""

    def __init__(self, cfg: MixRunConfig):
        self.cfg = cfg
        self._batches: dict[str, list] | None = None

    def _prepare(self, trainer) -> dict[str, list]:
        B = mixer_batch_size(self.cfg)
        return {d: [T.global_batch(trainer.mesh, b) for b in trainer.data.eval_batches(
            d, self.cfg.mixing.eval_batches, B, jax.process_index(), jax.process_count())]
            for d in self.cfg.training_domains}

    def __call__(self, trainer) -> dict[str, float]:
        if self._batches is None:
            self._batches = self._prepare(trainer)
        out = {}
        for d, batches in self._batches.items():
            i = trainer.domains.index(d)
            loss = tokens = 0.0
            for b in batches:
                r = jax.device_get(trainer.eval_step(trainer.state, b))
                loss += float(np.asarray(r["loss_sum"], np.float64)[i])
                tokens += float(np.asarray(r["tokens"], np.float64)[i])
            out[d] = loss / max(tokens, 1.0)
        return out


class StepBatches:
    """DGA's batches: row r of step s of a domain is window ``s * B + r`` of a seeded stream over
    its training split (seed apart from the training stream's), so they are a pure function of
    (domain, step) and a resumed run draws the same ones. This process's rows only."""

    def __init__(self, cfg: MixRunConfig, data):
        self.cfg, self.data, self.B = cfg, data, mixer_batch_size(cfg)
        seed = int(hashlib.blake2b(f"dga/{cfg.data.seed}".encode(), digest_size=4).hexdigest(), 16)
        self.streams = {d: DomainStream(d, data.num_tokens(d, "train"), cfg.data.seq_len, seed)
                        for d in cfg.data.domains}

    def batch(self, domain: str, step: int) -> dict[str, np.ndarray]:
        from moejax.data.pipeline import local_rows
        store = self.data.stores[(domain, "train")]
        rows = [make_row(store, self.streams[domain].start(j), self.cfg.data.seq_len,
                         self.data.tokenizer.pad_id)
                for j in local_rows(step, self.B, jax.process_index(), jax.process_count())]
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        out["domain"] = np.full(len(rows), self.cfg.data.domains.index(domain), np.int32)
        return out

    def domain_batches(self, step: int) -> dict[str, dict]:
        return {d: self.batch(d, step) for d in self.cfg.training_domains}

    def target_batch(self, step: int) -> dict:
        return self.batch(self.cfg.mixing.target_domain, step)


def make_mixer(cfg: MixRunConfig, data):
    """The online mixer of ``cfg.mixing.method`` (None for the static methods)."""
    m, train = cfg.mixing, cfg.training_domains
    if m.method == "aioli":
        inner = aioli.AioliMixer(train, HeldOutLosses(cfg), m.aioli)
    elif m.method == "dga":
        batches = StepBatches(cfg, data)
        select = (dga.last_layers(cfg.model, m.dga_layers) if m.dga_layers else dga.all_params)
        inner = dga.DGAMixer(train, batches.domain_batches, batches.target_batch, m.dga,
                             param_filter=select)
    else:
        return None
    return TargetZero(inner, tuple(cfg.data.domains))


def mixer_summary(mixer) -> dict:
    """What the report reads of an online mixer: Aioli's A matrices and weights, DGA's alpha."""
    if mixer is None:
        return {}
    inner = mixer.inner
    if isinstance(inner, aioli.AioliMixer):
        lists = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {"aioli/A": lists(inner.A), "aioli/A_ema": lists(inner.A_ema),
                "aioli/weights": lists(inner.weights), "aioli/rounds": inner.rounds_done,
                "mixer/domains": list(inner.domains)}
    return {"dga/alpha": inner.alpha.tolist(), "dga/updates": inner.updates,
            "dga/inner_products": (None if inner.inner_products is None
                                   else inner.inner_products.tolist()),
            "mixer/domains": list(inner.domains)}


# -- one run ------------------------------------------------------------------------------------
class StaticMixer:
    """Sets fixed weights before the first step and never changes them: the run's config.json
    stays the arm's (its ``data.mixture`` unread), and the weights live in the data state."""

    def __init__(self, weights: Mapping[str, float]):
        self.weights = dict(weights)

    def before_step(self, trainer, step: int) -> dict[str, float] | None:
        return self.weights if step == 0 else None

    def state(self) -> dict:
        return {"weights": self.weights}

    def load_state(self, state: dict) -> None:
        if state != self.state():
            raise ValueError(f"the checkpoint's static mixture {state} is not this run's "
                             f"{self.state()}: use a new workdir")


def static_run(cfg: MixRunConfig, workdir: str, weights: Mapping[str, float], *,
               on_step: OnStep = None, progress: bool = True) -> dict:
    """A ``Trainer`` run of the arm's config on the static mixture ``weights`` (target 0)."""
    mixer = StaticMixer(full_weights(cfg, weights))
    return Trainer(cfg, workdir, on_step=on_step, progress=progress, mixer=mixer).run()


def online_run(cfg: MixRunConfig, workdir: str, *, on_step: OnStep = None,
               progress: bool = True) -> dict:
    """A run whose weights the method's mixer sets from step 0 on."""
    trainer = Trainer(cfg, workdir, on_step=on_step, progress=progress)
    mixer = make_mixer(cfg, trainer.data)
    trainer.mixer = mixer
    return {**trainer.run(), **mixer_summary(mixer)}


def run_mixing_arm(cfg: MixRunConfig, workdir: str, *, on_step: OnStep = None,
                   progress: bool = True) -> dict:
    """Train one arm (``cfg.mixing.method``) in ``workdir``; RegMix's sweep goes to
    ``regmix_dir(cfg, parent of workdir)``. Returns the trainer's summary plus the method's."""
    method = cfg.mixing.method
    if method in ("aioli", "dga"):
        return online_run(cfg, workdir, on_step=on_step, progress=progress)
    if method == "regmix":
        return run_regmix(cfg, workdir, on_step=on_step, progress=progress)
    from moejax.data import prepare_data
    weights = (natural_shares(cfg, prepare_data(cfg.data)) if method == "natural"
               else uniform(cfg))
    return {**static_run(cfg, workdir, weights, on_step=on_step, progress=progress),
            "mixture": full_weights(cfg, weights)}


# -- RegMix -------------------------------------------------------------------------------------
def scaled_model(cfg: MixRunConfig, num_layers: int, d_model: int):
    """``cfg.model`` with ``num_layers`` / ``d_model`` where given (0 keeps them; d_ff scales)."""
    m = cfg.model
    kw: dict[str, Any] = {}
    if num_layers:
        kw["num_layers"] = num_layers
    if d_model:
        kw.update(d_model=d_model, d_ff=max(1, m.d_ff * d_model // m.d_model))
    return dataclasses.replace(m, **kw)


def proxy_config(cfg: MixRunConfig, *, larger: bool = False) -> MixRunConfig:
    """The config of every proxy (or larger run): the target run's, at proxy size and steps,
    static, with the neutral uniform mixture (each proxy sets its own)."""
    r = cfg.mixing.regmix
    model = (scaled_model(cfg, r.larger_num_layers, r.larger_d_model) if larger
             else scaled_model(cfg, r.proxy_num_layers, r.proxy_d_model))
    steps = cfg.train.steps if larger else (r.proxy_steps or cfg.train.steps)
    train = dataclasses.replace(cfg.train, steps=steps,
                                warmup_steps=min(cfg.train.warmup_steps, max(steps // 10, 1)),
                                eval_every=steps, ckpt_every=min(cfg.train.ckpt_every, steps),
                                log_every=min(cfg.train.log_every, steps))
    base = dataclasses.replace(cfg, model=model, train=train, mixing=sweep_mixing(cfg))
    return with_mixture(base, uniform(cfg))


def sweep_mixing(cfg: MixRunConfig) -> MixingConfig:
    """The mixing section a proxy is trained under: static, with only what decides the sweep's
    runs kept (regressor, choice and the online methods' knobs at their defaults), so changing
    those reuses the sweep."""
    m, r = cfg.mixing, cfg.mixing.regmix
    keep = RegMixConfig(**{f: getattr(r, f) for f in SWEEP_FIELDS})
    return MixingConfig(method="natural", target_domain=m.target_domain, natural=m.natural,
                        regmix=keep)


def regmix_dir(cfg: MixRunConfig, root: str) -> str:
    """The sweep's directory: one per proxy config and sweep settings, shared by arms."""
    key = json.dumps({"proxy": proxy_config(cfg).to_dict(),
                      "larger": proxy_config(cfg, larger=True).to_dict()}, sort_keys=True)
    return os.fspath(as_path(root) / f"_regmix-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def target_metric(cfg: MixRunConfig, summary: Mapping[str, Any]) -> float:
    """The loss RegMix regresses: the mean of the training domains' val losses, or one
    domain's (``mixing.regmix.metric``)."""
    metric = cfg.mixing.regmix.metric
    if metric == MEAN_METRIC:
        return float(np.mean([summary[f"val/loss/{d}"] for d in cfg.training_domains]))
    return float(summary[f"val/loss/{metric}"])


def proxy_weights(cfg: MixRunConfig, data) -> dict[str, dict[str, float]]:
    """The sweep's mixtures: ``num_proxies`` to fit, then ``held_out`` to score (names in
    order), Dirichlet around the natural shares."""
    r = cfg.mixing.regmix
    natural = natural_shares(cfg, data)
    return regmix.proxy_mixtures(cfg.training_domains, list(natural.values()),
                                 r.num_proxies + r.held_out, seed=r.seed)


def final_evaluation(workdir, step: int) -> dict:
    """The evaluation record of ``step`` in the run's metrics.jsonl (a run found finished, e.g.
    after a crash between its last checkpoint and the sweep's record, trains no step and its
    summary holds no losses)."""
    evals = [r for r in read_metrics(as_path(workdir) / "metrics.jsonl")
             if r.get("step") == step and "val/loss" in r]
    if not evals:
        raise RuntimeError(f"{workdir}: no evaluation at step {step} in metrics.jsonl")
    return evals[-1]


def train_proxy(cfg: MixRunConfig, run_cfg: MixRunConfig, workdir, weights: Mapping[str, float],
                *, on_step: OnStep = None, progress: bool = True) -> dict:
    """One sweep run (proxy or larger) on ``weights``: its final val losses per domain. A run
    already finished with this config (its summary.json) is read back without a trainer; an
    interrupted one resumes from its checkpoint; a signal raises ``SweepInterrupted``."""
    from moejax import experiment
    run = with_mixture(run_cfg, weights)
    done = experiment.reuse_finished(os.fspath(workdir), run)
    if done is None:
        s = Trainer(run, workdir, on_step=on_step, progress=progress).run()
        if s.get("preempted"):
            raise SweepInterrupted(f"{as_path(workdir).name} stopped at step {s['step']}")
        if jax.process_index() == 0:
            experiment.write_summary(os.fspath(workdir), s, run)
        step = s["step"]
    else:
        step = done["step"]
    final = final_evaluation(workdir, step)
    return {"val/loss": final["val/loss"],
            **{f"val/loss/{d}": final[f"val/loss/{d}"] for d in cfg.data.domains}}


def _sweep(cfg: MixRunConfig, root: str, configs: Mapping[str, Mapping[str, float]],
           state_file: str, run_cfg: MixRunConfig, on_step: OnStep, progress: bool) -> dict:
    """Run (or resume) every run of ``configs`` at ``run_cfg``'s size; ``{name: result}``."""
    def run_one(name: str, weights: Mapping[str, float]) -> dict:
        return train_proxy(cfg, run_cfg, as_path(root) / name, weights, on_step=on_step,
                           progress=progress)
    return regmix.run_sweep(configs, run_one, as_path(root) / state_file,
                            max_workers=cfg.mixing.regmix.max_workers)


def fit_and_choose(cfg: MixRunConfig, mixes: Mapping[str, Mapping[str, float]],
                   results: Mapping[str, Mapping[str, float]], natural: Mapping[str, float],
                   larger: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """Fit the regressor on the first ``num_proxies`` runs, its Spearman on the held-out ones
    (and on the larger runs), and the chosen mixture (top-k average of the candidates)."""
    r, train = cfg.mixing.regmix, cfg.training_domains
    names = list(mixes)
    fit_names, held = names[:r.num_proxies], names[r.num_proxies:]
    X = lambda ns: np.array([[mixes[n][d] for d in train] for n in ns])  # noqa: E731
    y = lambda ns: np.array([target_metric(cfg, results[n]) for n in ns])  # noqa: E731
    model = regmix.fit_regressor(X(fit_names), y(fit_names), r.regressor, seed=r.seed)
    pred_held = regmix.predict(model, X(held))
    out = {"regmix/spearman": regmix.spearman(pred_held, y(held)),
           "regmix/held_out": {n: {"predicted": float(p), "measured": float(m)}
                               for n, p, m in zip(held, pred_held, y(held))},
           "regmix/regressor": r.regressor, "regmix/metric": r.metric,
           "regmix/spearman_by_regressor": {  # both kinds, to compare (the configured one chooses)
               kind: regmix.spearman(regmix.predict(regmix.fit_regressor(
                   X(fit_names), y(fit_names), kind, seed=r.seed), X(held)), y(held))
               for kind in ("linear", "lgbm")}}
    if larger:
        ln = list(larger)
        big = np.array([target_metric(cfg, larger[n]) for n in ln])
        pred_big = regmix.predict(model, X(ln))
        out["regmix/larger"] = {n: {"proxy": float(p0), "predicted": float(p), "measured": float(b)}
                                for n, p0, p, b in zip(ln, y(ln), pred_big, big)}
        if len(ln) >= 3:  # rank invariance: proxy-size ranking vs the larger runs' ranking
            out["regmix/spearman_larger"] = regmix.spearman(y(ln), big)
    chosen = regmix.choose_mixture(model, list(natural.values()), r.candidates, r.top_k,
                                   seed=r.seed + 1)
    out["regmix/chosen"] = weights_by_name(train, chosen)
    return out


def run_regmix(cfg: MixRunConfig, workdir: str, *, on_step: OnStep = None,
               progress: bool = True) -> dict:
    """The sweep (resumable), the larger runs, the fit, then the target run on the chosen
    mixture. A signal during a proxy returns ``{"preempted": True}`` (rerun to resume)."""
    from moejax.data import prepare_data
    data = prepare_data(cfg.data)
    r = cfg.mixing.regmix
    root = regmix_dir(cfg, os.fspath(as_path(workdir).parent))
    mixes = proxy_weights(cfg, data)
    held = list(mixes)[r.num_proxies:]
    try:
        results = _sweep(cfg, root, mixes, SWEEP_FILE, proxy_config(cfg), on_step, progress)
        larger = None
        if r.num_larger:
            larger = _sweep(cfg, root, {f"larger-{n}": mixes[n] for n in held[:r.num_larger]},
                            LARGER_FILE, proxy_config(cfg, larger=True), on_step, progress)
            larger = {n.removeprefix("larger-"): v for n, v in larger.items()}
    except SweepInterrupted as e:
        print(f"RegMix sweep in {root} interrupted ({e}); rerun to resume")
        return {"step": 0, "preempted": True}
    fit = fit_and_choose(cfg, mixes, results, natural_shares(cfg, data), larger)
    fit["regmix/proxies"] = {n: {"mixture": mixes[n], "metric": target_metric(cfg, results[n])}
                             for n in mixes}
    fit["regmix/sweep_dir"] = root
    if jax.process_index() == 0:
        write_text_atomic(as_path(root) / FIT_FILE, json.dumps(fit, indent=1, sort_keys=True))
    summary = static_run(cfg, workdir, fit["regmix/chosen"], on_step=on_step, progress=progress)
    return {**summary, **{k: v for k, v in fit.items() if k != "regmix/proxies"},
            "mixture": full_weights(cfg, fit["regmix/chosen"])}
