"""kernels.gmm: every CPU implementation equals a float64 numpy loop; gradients check out."""

import importlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from moejax import kernels

M, K, N, G = 48, 16, 8, 6


def np_gmm(lhs, rhs, group_sizes):
    """float64 loop: row m uses rhs[g] for the group it falls in; rows past the total are zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, n in enumerate(np.asarray(group_sizes)):
        out[start:start + n] = lhs[start:start + n] @ rhs[g]
        start += n
    return out


GROUPS = {
    "random_with_zeros": np.array([10, 0, 17, 3, 0, 18]),
    "one_takes_all": np.array([0, 0, M, 0, 0, 0]),
    "tail_unassigned": np.array([5, 0, 9, 0, 12, 1]),  # sum 27 < M: rows 27.. are zeros
    "all_empty": np.zeros(G, int),
    # block 8: ceil-sums to 11 = M/8 + G - 1 blocks, the most any split of M rows can need
    "most_padding": np.array([9, 9, 9, 9, 9, 3]),
}


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(G, K, N)).astype(np.float32))


@pytest.fixture(scope="module")
def jitted():
    return {impl: jax.jit(lambda a, b, gs, impl=impl: kernels.gmm(a, b, gs, impl=impl))
            for impl in ("reference", "xla", "blocked")}


@pytest.mark.parametrize("impl", ["reference", "xla", "blocked"])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_gmm_matches_numpy(operands, jitted, impl, groups):
    lhs, rhs = operands
    gs = GROUPS[groups]
    out = jitted[impl](lhs, rhs, jnp.asarray(gs, jnp.int32))
    assert out.shape == (M, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[gs.sum():] == 0)


def test_gmm_preferred_element_type(operands):
    lhs, rhs = operands
    gs = jnp.asarray(GROUPS["random_with_zeros"], jnp.int32)
    for impl in ("reference", "xla", "blocked"):
        out = kernels.gmm(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), gs, impl=impl,
                          preferred_element_type=jnp.float32)
        assert out.dtype == jnp.float32
        ref = np_gmm(np.asarray(lhs.astype(jnp.bfloat16), np.float32),
                     np.asarray(rhs.astype(jnp.bfloat16), np.float32), GROUPS["random_with_zeros"])
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-2, atol=1e-2)


def test_reference_gradients_numerically(operands):
    lhs, rhs = operands
    gs = jnp.asarray([3, 0, 5, 2, 0, 4], jnp.int32)  # 14 of 16 rows assigned
    check_grads(lambda a, b: kernels.gmm(a, b, gs, impl="reference"),
                (lhs[:16], rhs),
                order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blocked_gradients_numerically_and_block_sizes(operands, block):
    """Blocks smaller than, straddling and larger than groups (M=48): values equal numpy and
    gradients pass check_grads, including empty groups and unassigned tail rows."""
    from moejax.kernels.gmm import blocked
    lhs, rhs = operands
    for name, groups in GROUPS.items():
        gs = jnp.asarray(groups, jnp.int32)
        out = jax.jit(lambda a, b: blocked(a, b, gs, block=block))(lhs, rhs)
        np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs, groups), rtol=1e-5, atol=1e-5)
    gs = jnp.asarray(GROUPS["tail_unassigned"], jnp.int32)
    check_grads(lambda a, b: blocked(a, b, gs, block=block), (lhs, rhs), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def np_block_layout(gs, rows, block):
    """Loop: group g's n rows fill ceil(n/block) consecutive blocks from the next free one.
    Returns (src [NB*block], dest [rows], block_group [NB], blocks used) with out-of-range 'no
    row' markers."""
    G = len(gs)
    NB = rows // block + G
    src, dest, group = np.full(NB * block, rows), np.full(rows, NB * block), np.full(NB, G - 1)
    b = start = 0
    for g, n in enumerate(gs):
        nb = -(-n // block)
        group[b:b + nb] = g
        for i in range(n):
            src[b * block + i], dest[start + i] = start + i, b * block + i
        b, start = b + nb, start + n
    assert b <= NB
    return src, dest, group, b


@pytest.mark.parametrize("block", [8, 16, 64])
def test_block_layout_matches_numpy_loop(block):
    """The layout shared by ``blocked`` and the fused MoE FFN equals a plain loop, including
    empty groups, unassigned tail rows and the most-padding split (NB - 1 blocks used)."""
    layout = jax.jit(gmm_bodies().block_layout, static_argnums=(1, 2))
    for name, gs in GROUPS.items():
        lay = layout(jnp.asarray(gs, jnp.int32), M, block)
        src, dest, group, used = np_block_layout(gs, M, block)
        assert (lay.block, lay.num_blocks) == (block, M // block + G), name
        np.testing.assert_array_equal(np.asarray(lay.src), src, err_msg=name)
        np.testing.assert_array_equal(np.asarray(lay.dest), dest, err_msg=name)
        np.testing.assert_array_equal(np.asarray(lay.block_group), group, err_msg=name)
        assert int(lay.used) == used, name  # the loop form computes exactly these blocks


def test_auto_is_blocked_on_cpu():
    assert jax.default_backend() == "cpu" and kernels.resolve_gmm_impl("auto") == "blocked"
    assert kernels.resolve_gmm_impl("xla") == "xla"


@pytest.mark.parametrize("backend,tokamax,want", [
    ("cpu", False, "blocked"), ("cpu", True, "blocked"),
    ("gpu", True, "tokamax"), ("gpu", False, "blocked"),  # never ragged_dot (~1% of peak there)
    ("tpu", False, "pallas"), ("tpu", True, "pallas"),  # gmm_tpu: tokamax if importable, megablox
])
def test_auto_resolution_table(monkeypatch, backend, tokamax, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(gmm_bodies(), "have_tokamax", lambda: tokamax, raising=False)
    assert kernels.resolve_gmm_impl("auto") == want
    assert kernels.resolve_gmm_impl("auto", backend="cpu") == "blocked"
    for impl in GMM_EXPLICIT:
        assert kernels.resolve_gmm_impl(impl) == impl


GMM_EXPLICIT = ("reference", "xla", "blocked", "tokamax", "pallas")


def gmm_bodies():
    """The module moejax.kernels.gmm (the package attribute of that name is the function)."""
    return importlib.import_module("moejax.kernels.gmm")


@pytest.mark.parametrize("backend,want", [("cpu", "loop"), ("gpu", "batched"), ("tpu", "batched")])
def test_blocked_expert_ffn_form_per_backend(monkeypatch, backend, want):
    """The MoE layer's block-layout experts: the live-block loop on CPU, one batched einsum over
    all blocks where a loop of small dots would starve the device."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert kernels.resolve_blocked_ffn() == want == kernels.resolve_blocked_ffn(backend)


def test_auto_on_gpu_without_tokamax_runs_blocked(operands, monkeypatch):
    """The GPU fallback is the exact block-padded path: same numbers as the float64 loop."""
    lhs, rhs = operands
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gmm_bodies(), "have_tokamax", lambda: False, raising=False)
    monkeypatch.setattr(gmm_bodies(), "xla", None)  # ragged_dot must not be reached
    gs = GROUPS["tail_unassigned"]
    out = kernels.gmm(lhs, rhs, jnp.asarray(gs, jnp.int32), impl="auto")
    np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs, gs), rtol=1e-5, atol=1e-5)


def test_ragged_dot_gradients_equal_reference(operands):
    lhs, rhs = operands
    ct = np.random.default_rng(1).normal(size=(M, N)).astype(np.float32)

    def grads(impl, gs):
        f = lambda a, b: jnp.sum(kernels.gmm(a, b, gs, impl=impl) * ct)
        return jax.jit(jax.grad(f, argnums=(0, 1)))(lhs, rhs)

    for name in ("random_with_zeros", "one_takes_all", "tail_unassigned"):
        gs = jnp.asarray(GROUPS[name], jnp.int32)
        (ra, rb) = grads("reference", gs)
        for impl in ("xla", "blocked"):
            xa, xb = grads(impl, gs)
            np.testing.assert_allclose(np.asarray(xa), np.asarray(ra), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(xb), np.asarray(rb), rtol=1e-5, atol=1e-4)
        # dlhs by hand: ct @ rhs[g]^T per row; tail rows get zero gradient.
        n = int(GROUPS[name].sum())
        assert np.all(np.asarray(ra)[n:] == 0)


def test_gpu_impls_fail_clearly_or_match(operands):
    lhs, rhs = operands
    gs = jnp.asarray(GROUPS["random_with_zeros"], jnp.int32)
    try:
        import tokamax  # noqa: F401
        have_tokamax = True
    except ImportError:
        have_tokamax = False
    if have_tokamax:  # the GPU machine: same numbers as the float64 loop
        out = kernels.gmm(lhs, rhs, gs, impl="tokamax")
        np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs, GROUPS["random_with_zeros"]),
                                   rtol=1e-3, atol=1e-3)
    else:
        with pytest.raises(ImportError, match=r"pip install moejax\[gpu\] on Python >= 3.12"):
            kernels.gmm(lhs, rhs, gs, impl="tokamax")
    with pytest.raises(NotImplementedError, match="Pallas grouped-matmul kernel"):
        kernels.gmm(lhs, rhs, gs, impl="pallas")
    with pytest.raises(ValueError, match="gmm impl='nope' is unknown"):
        kernels.gmm(lhs, rhs, gs, impl="nope")
