"""benchmarks/rollout.py in its --smoke mode: both sides emit every row's N tokens from the same
weights (greedy decoding agrees token for token) and the JSON record has what RESULTS.md quotes."""

import json

import numpy as np

from benchmarks import rollout


def test_left_padded_rows_repeat_each_prompt_g_times():
    tokens = np.array([[5, 6, 7, 0], [8, 0, 0, 0]], np.int32)
    ids, mask = rollout.left_padded_rows(tokens, np.array([3, 1]), G=2)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])


def test_smoke_run_same_model_both_sides(tmp_path):
    out = tmp_path / "rollout.json"
    rollout.main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    r = record["results"]["smoke"]
    assert r["greedy_match"] == 1.0  # same weights, positions and masks in HF and moejax
    assert r["rows"] == 4 and r["N"] == 4
    assert r["compiles"] == 1  # timed, warm-up and greedy calls all reuse one bucket program
    assert r["tokens_per_s"]["hf"] > 0 and r["tokens_per_s"]["moejax"] > 0
    for key in ("date", "cpu", "jax", "torch", "transformers", "settings"):
        assert record[key]
