"""Attention over a head-major KV cache (moejax.kernels.decode_attention) against a float64 loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import decode_attention

B, H, HKV, HD, S = 3, 6, 2, 8, 12


def loop_reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sink):
    """Per (row, query, head) in float64: softmax over the visible slots (kv_pos <= q_pos, same
    segment, kv segment != 0) plus the sink logit; zeros for padding queries."""
    Bq, T, Hq, hd = q.shape
    out = np.zeros((Bq, T, Hq, hd))
    for b in range(Bq):
        for t in range(T):
            if q_seg[b, t] == 0:
                continue
            vis = (kv_pos[b] <= q_pos[b, t]) & (kv_seg[b] == q_seg[b, t]) & (kv_seg[b] != 0)
            for h in range(Hq):
                kh = h // (Hq // k.shape[1])
                logits = k[b, kh].astype(np.float64) @ q[b, t, h].astype(np.float64) / np.sqrt(hd)
                logits = logits[vis]
                top = logits.max(initial=-np.inf if sink is None else sink[h])
                e = np.exp(logits - top)
                z = e.sum() + (0.0 if sink is None else np.exp(sink[h] - top))
                out[b, t, h] = (e / z) @ v[b, kh][vis].astype(np.float64)
    return out


@pytest.mark.parametrize("T", [1, 5], ids=["decode", "prefill"])
@pytest.mark.parametrize("sink", [False, True], ids=["plain", "sink"])
def test_head_major_attention_equals_a_float64_loop(T, sink):
    """GQA (3 query heads per kv head), ragged rows with empty slots, two packed segments in one
    row, a padding query, and a sink: equal to the loop within fp32 rounding."""
    rng = np.random.default_rng(T + 10 * sink)
    q = rng.normal(size=(B, T, H, HD)).astype(np.float32)
    k = rng.normal(size=(B, HKV, S, HD)).astype(np.float32)
    v = rng.normal(size=(B, HKV, S, HD)).astype(np.float32)
    kv_seg = np.ones((B, S), np.int32)
    kv_seg[0, 9:] = 0  # empty slots
    kv_seg[1, 4:] = 2  # a second packed segment
    kv_pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    kv_pos[1, 4:] -= 4
    q_pos = np.stack([np.arange(T) + 9 - T, np.arange(T) + 8 - T, np.arange(T) + 3]).astype(np.int32)
    q_seg = np.array([[1] * T, [2] * T, [1] * T], np.int32)
    q_seg[2, -1] = 0  # a padding query gives zeros
    sink_logits = rng.normal(size=(H,)).astype(np.float32) if sink else None
    got = decode_attention.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg), q_positions=jnp.asarray(q_pos),
        kv_positions=jnp.asarray(kv_pos),
        sink_logits=None if sink_logits is None else jnp.asarray(sink_logits))
    want = loop_reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sink_logits)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[2, -1], 0)
