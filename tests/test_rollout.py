"""Rollout engine (moejax.rl.rollout) against plain references: greedy == argmax of a full forward,
logprobs == teacher-forced log-softmax (policy) or the renormalised top-k/top-p distribution
(sampling), EOS, layout and masks by a loop, MoE routing == the full forward's, sharded == single
device, one compile per shape bucket. One tiny fp32 model per kind, programs shared by fixtures."""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax.config import MeshConfig
from moejax.config_checks import ConfigError
from moejax.config_moe import MoEConfig
from moejax.model import Model
from moejax.rl.rollout import RolloutConfig, RolloutEngine
from moejax.testing import TOL_FP32, TOL_SHARDED_FP32, setup_for, tiny_model

P, N = 12, 10  # prompt bucket, new tokens
BP, G = 4, 2  # prompts x generations = 8 rows
LENS = np.array([12, 3, 7, 1], np.int32)
TEMP = 0.7
PAD = 0
VOCAB = 288
DENSE = tiny_model()
MOE = tiny_model(moe=MoEConfig(num_experts=8, top_k=2, d_expert=32))


def prompts(seed=1, lens=LENS, width=P):
    """Right-padded random prompts [len(lens), width] (token 0 = pad never inside a prompt)."""
    p = np.random.default_rng(seed).integers(1, VOCAB, size=(len(lens), width)).astype(np.int32)
    p[np.arange(width)[None] >= lens[:, None]] = PAD
    return p


PROMPTS = prompts()


@jax.jit(static_argnums=0)
def full_forward(graphdef, params, rest, tokens):
    """Teacher-forced logits [B,T,V] and aux of whole rows (causal: trailing pad is harmless)."""
    return nnx.merge(graphdef, params, rest)(tokens)


class Built:
    """A tiny model's weights placed for a ``setup_for`` setup, and its full-forward reference."""

    def __init__(self, model_cfg, mesh=MeshConfig(data=1), devices=1, seed=0):
        self.setup = setup_for(model_cfg, mesh, devices)
        _, params, rest = nnx.split(Model(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        sh = self.setup.state_shardings
        self.weights = jax.device_put((params, rest), (sh.params, sh.rest))

    def engine(self, cfg: RolloutConfig, eos_id: int) -> RolloutEngine:
        return RolloutEngine(self.setup, cfg, eos_id=eos_id, pad_id=PAD)

    def forward(self, tokens):
        logits, aux = full_forward(self.setup.graphdef, *self.weights, tokens)
        return np.asarray(logits, np.float64), aux


def first_greedy_tokens(built: Built) -> np.ndarray:
    """The argmax next token after each prompt [BP], from one full forward (no engine)."""
    rows = np.zeros((BP * G, P + N), np.int32)
    rows[:BP, :P] = PROMPTS
    logits, _ = built.forward(rows)
    return logits[np.arange(BP), LENS - 1].argmax(-1)


def log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced(logits, tokens):
    """[B,T-1] log-prob of tokens[:, t+1] under logits[:, t] (float64)."""
    lp = log_softmax64(logits[:, :-1])
    return np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]


def check_layout(r, eos):
    """Row layout and masks against a loop: prompt copy, completion (stopping at the first EOS or
    N), pad tail; completion_mask/routing_valid by hand; logprobs 0 off the mask."""
    for b in range(r.tokens.shape[0]):
        n, c = LENS[b // G], r.completion_lengths[b]
        np.testing.assert_array_equal(r.tokens[b, :n], PROMPTS[b // G, :n])
        gen = r.tokens[b, n:n + c]
        hits = np.flatnonzero(gen == eos)
        assert (hits.size == 0 and c == N) or (hits.size and hits[0] == c - 1), (b, gen, c)
        assert r.finished[b] == bool(hits.size)
        np.testing.assert_array_equal(r.tokens[b, n + c:], PAD)
        mask = np.zeros(P + N - 1, bool)
        mask[n - 1:n - 1 + c] = True  # targets tokens[t+1] that were generated
        np.testing.assert_array_equal(r.completion_mask[b], mask)
        if r.routing_valid is not None:
            np.testing.assert_array_equal(r.routing_valid[b], np.arange(P + N) < n + c - 1)
    assert (r.logprobs[~r.completion_mask] == 0).all()
    np.testing.assert_array_equal(r.prompt_lengths, np.repeat(LENS, G))


# -- dense model, one device -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense():
    built = Built(DENSE)
    first = first_greedy_tokens(built)
    eos = int(first[1])  # prompt 1's greedy first token: its rows stop at once under greedy
    engine = built.engine(RolloutConfig(max_prompt_len=P, max_new_tokens=N, temperature=TEMP,
                                        top_p=0.9), eos)
    greedy = engine.generate(built.weights, PROMPTS, LENS, num_generations=G,
                             rng=jax.random.key(0), greedy=True).numpy()
    sampled = engine.generate(built.weights, PROMPTS, LENS, num_generations=G,
                              rng=jax.random.key(0)).numpy()
    return dict(built=built, engine=engine, eos=eos, first=first, greedy=greedy, sampled=sampled)


def test_greedy_equals_full_forward_argmax_at_every_step(dense):
    r = dense["greedy"]
    check_layout(r, dense["eos"])
    pred = dense["built"].forward(r.tokens)[0].argmax(-1)  # [B,T,V] -> [B,T]
    for b in range(r.tokens.shape[0]):
        n, c = LENS[b // G], r.completion_lengths[b]
        np.testing.assert_array_equal(r.tokens[b, n:n + c], pred[b, n - 1:n - 1 + c])
    # the G rows of a prompt (one prefill, cache repeated) are identical under greedy
    for name in ("tokens", "logprobs", "completion_lengths"):
        x = getattr(r, name).reshape(BP, G, *getattr(r, name).shape[1:])
        np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1], x.shape))
    assert r.routing is None  # dense model


def test_eos_stops_a_row_and_its_tail_gets_no_loss(dense):
    r, eos = dense["greedy"], dense["eos"]
    stopped = np.repeat(dense["first"] == eos, G)  # rows whose first greedy token is the EOS
    assert stopped.any() and not stopped.all()
    assert (r.completion_lengths[stopped] == 1).all() and r.finished[stopped].all()
    for b in np.flatnonzero(stopped):
        n = LENS[b // G]
        assert r.tokens[b, n] == eos  # the EOS is kept as a completion token
        assert r.completion_mask[b].sum() == 1 and r.completion_mask[b, n - 1]
        np.testing.assert_array_equal(r.tokens[b, n + 1:], PAD)
    assert (r.completion_lengths == N).any()  # other rows ran to the length cap


def test_policy_logprobs_equal_teacher_forced_log_softmax(dense):
    r, g = dense["sampled"], dense["greedy"]
    check_layout(r, dense["eos"])
    logits, _ = dense["built"].forward(r.tokens)
    ref = teacher_forced(logits / TEMP, r.tokens)  # policy: no top-p truncation
    m = r.completion_mask
    np.testing.assert_allclose(r.logprobs[m], ref[m], *TOL_FP32)
    assert (r.tokens != g.tokens).any()  # it sampled
    assert (r.tokens[0::2] != r.tokens[1::2]).any()  # the G rows of a prompt differ
    # greedy rows report the policy logprob of the argmax token
    ref_g = teacher_forced(dense["built"].forward(g.tokens)[0] / TEMP, g.tokens)
    np.testing.assert_allclose(g.logprobs[g.completion_mask], ref_g[g.completion_mask], *TOL_FP32)


def test_one_compile_per_shape_bucket(dense):
    engine, w = dense["engine"], dense["built"].weights
    assert engine.compiles == 1  # greedy and sampled calls share the program
    lens = np.array([5, 2, 8, 1], np.int32)  # other prompts, narrower than the bucket
    r = engine.generate(w, prompts(seed=7, lens=lens, width=8), lens, num_generations=G,
                        rng=jax.random.key(3))
    assert engine.compiles == 1 and r.tokens.shape == (BP * G, P + N)
    engine.generate(w, PROMPTS, LENS, num_generations=1, rng=jax.random.key(3))  # new G
    assert engine.compiles == 2


def top_k_p_reference(scaled, k, p):
    """Log-probs [V] of the distribution sampled from: top k of ``scaled`` (float64), renormalised,
    then the smallest most-probable set of mass >= p within them, renormalised (a loop)."""
    order = np.argsort(-scaled, kind="stable")[:k]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    kept, mass = [], 0.0
    for tok, q in zip(order, probs):
        if mass >= p:
            break
        kept.append(tok)
        mass += q
    out = np.full(scaled.shape, -np.inf)
    out[kept] = log_softmax64(scaled[kept])
    return out


TOP_K, TOP_P = 3, 0.5


@pytest.fixture(scope="module")
def topk(dense):
    """Sampling-mode logprobs under top-k + top-p, on a larger KV bucket."""
    cfg = RolloutConfig(max_prompt_len=P, max_new_tokens=N, kv_len=P + N + 10, temperature=TEMP,
                        top_k=TOP_K, top_p=TOP_P, logprobs="sampling")
    engine = dense["built"].engine(cfg, dense["eos"])
    w = dense["built"].weights
    sampled = engine.generate(w, PROMPTS, LENS, num_generations=G, rng=jax.random.key(1)).numpy()
    greedy = engine.generate(w, PROMPTS, LENS, num_generations=G, rng=jax.random.key(1),
                             greedy=True).numpy()
    return dict(sampled=sampled, greedy=greedy)


def test_top_k_sampling_stays_in_top_k_and_logprobs_are_renormalised(dense, topk):
    r = topk["sampled"]
    check_layout(r, dense["eos"])
    logits = dense["built"].forward(r.tokens)[0] / TEMP
    kept_sizes = []
    for b, t in zip(*np.nonzero(r.completion_mask)):
        tok = r.tokens[b, t + 1]
        assert tok in np.argsort(-logits[b, t])[:TOP_K]
        ref = top_k_p_reference(logits[b, t], TOP_K, TOP_P)
        np.testing.assert_allclose(r.logprobs[b, t], ref[tok], *TOL_FP32)
        kept_sizes.append(np.isfinite(ref).sum())
    assert min(kept_sizes) < TOP_K  # top-p truncated further within the top k somewhere
    # a larger KV bucket changes nothing: greedy equals the default bucket's greedy
    np.testing.assert_array_equal(topk["greedy"].tokens, dense["greedy"].tokens)


def test_sharded_dense_equals_single_device(dense):
    """data=8: 3 prompts x G=2 = 6 rows are filled to 8 with a dummy prompt; the real rows equal
    the single-device rollout's (row keys depend only on the row)."""
    built = Built(DENSE, MeshConfig(data=8), 8)
    engine = built.engine(RolloutConfig(max_prompt_len=P, max_new_tokens=N, temperature=TEMP,
                                        top_p=0.9), dense["eos"])
    r = engine.generate(built.weights, PROMPTS[:3], LENS[:3], num_generations=G,
                        rng=jax.random.key(0))
    assert r.tokens.sharding.num_devices == 8
    r, ref = r.numpy(), dense["sampled"]
    assert r.tokens.shape == (3 * G, P + N)
    np.testing.assert_array_equal(r.tokens, ref.tokens[:3 * G])
    np.testing.assert_array_equal(r.completion_mask, ref.completion_mask[:3 * G])
    np.testing.assert_allclose(r.logprobs, ref.logprobs[:3 * G], *TOL_SHARDED_FP32)


# -- MoE model: routing ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe():
    cfg = RolloutConfig(max_prompt_len=P, max_new_tokens=N, temperature=TEMP)
    single, sharded = Built(MOE), Built(MOE, MeshConfig(data=2, expert=4), 8)
    eos = int(first_greedy_tokens(single)[2])

    def run(built, greedy=False):
        return built.engine(cfg, eos).generate(built.weights, PROMPTS, LENS, num_generations=G,
                                               rng=jax.random.key(2), greedy=greedy)

    on_mesh = run(sharded)
    shard_rows = {name: getattr(on_mesh, name).sharding.shard_shape(getattr(on_mesh, name).shape)
                  for name in ("tokens", "logprobs", "routing")}
    return dict(eos=eos, built=single, single=run(single).numpy(), sharded=on_mesh.numpy(),
                greedy=run(single, greedy=True).numpy(), shard_shapes=shard_rows)


@pytest.mark.parametrize("run", ["single", "greedy"])
def test_moe_routing_equals_full_forward_routing(moe, run):
    """Prefill tokens from the prefill forward, generated ones from the decode step that fed them;
    -1 where a token was never fed (each row's last token, padding). Greedy rows of prompt 2
    stop at once (EOS = its first greedy token)."""
    r = moe[run]
    check_layout(r, moe["eos"])
    _, aux = moe["built"].forward(r.tokens)
    ref = np.asarray(aux["router/experts"])  # [L_moe,B,T,k]
    assert r.routing.shape == ref.shape == (MOE.num_layers, BP * G, P + N, 2)
    v = r.routing_valid
    np.testing.assert_array_equal(r.routing[:, v], ref[:, v])
    assert (r.routing[:, ~v] == -1).all()
    assert (r.routing[:, v] >= 0).all()
    if run == "greedy":
        assert r.finished[2 * G:3 * G].all() and (r.completion_lengths[2 * G:3 * G] == 1).all()
    assert (r.completion_lengths > 1).any()


def test_moe_sharded_equals_single_device(moe):
    a, b = moe["single"], moe["sharded"]
    assert moe["shard_shapes"] == {"tokens": (1, P + N), "logprobs": (1, P + N - 1),  # row/device
                                   "routing": (MOE.num_layers, 1, P + N, 2)}
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.routing, a.routing)
    np.testing.assert_array_equal(b.routing_valid, a.routing_valid)
    np.testing.assert_allclose(b.logprobs, a.logprobs, *TOL_SHARDED_FP32)


# -- configuration and input errors (no compile) ------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(kv_len=P + N - 1), "rl.rollout.kv_len"), (dict(kv_len=-1), "rl.rollout.kv_len"),
    (dict(temperature=0.0), "rl.rollout.temperature"), (dict(top_p=0.0), "rl.rollout.top_p"),
    (dict(top_p=1.5), "rl.rollout.top_p"), (dict(top_k=-1), "rl.rollout.top_k"),
    (dict(logprobs="train"), "rl.rollout.logprobs"), (dict(max_new_tokens=0),
                                                      "rl.rollout.max_new_tokens")])
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        RolloutConfig(**{"max_prompt_len": P, "max_new_tokens": N, **kw})


def test_kv_bucket_error_says_why():
    with pytest.raises(ConfigError, match="smaller than prompt \\+ max new tokens"):
        RolloutConfig(max_prompt_len=P, max_new_tokens=N, kv_len=P + N - 1)
    assert RolloutConfig(max_prompt_len=P, max_new_tokens=N).cache_len == P + N


def test_bad_prompts_are_refused_before_compiling(dense):
    engine, w = dense["engine"], dense["built"].weights
    wide = np.ones((BP, P + 1), np.int32)
    with pytest.raises(ConfigError, match="rl.rollout.max_prompt_len"):
        engine.generate(w, wide, np.full(BP, P + 1), num_generations=G, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_lengths"):
        engine.generate(w, PROMPTS, np.zeros(BP, np.int32), num_generations=G,
                        rng=jax.random.key(0))
