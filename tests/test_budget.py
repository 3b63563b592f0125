"""The data budget (tokens seen, passes per domain) against rows actually drawn by the iterator."""

import numpy as np
import pytest

from moejax.analysis.budget import WARN_PASSES, budget_markdown, domain_budget, rows_per_domain
from moejax.config import DataConfig
from moejax.data import prepare_data


@pytest.fixture(scope="module")
def data(data_cache):
    cfg = DataConfig(cache_dir=data_cache, corpus_bytes_per_domain=40_000, seq_len=32,
                     mixture=(3.0, 1.0, 2.0))
    return prepare_data(cfg, vocab_size=512)


def test_rows_per_domain_equal_the_iterators_domains(data):
    it = data.train_iterator(global_batch=8)
    drawn = np.concatenate([next(it)["domain"] for _ in range(12)])
    counts, exact = rows_per_domain(data, 12 * 8)
    assert exact
    np.testing.assert_array_equal(counts, np.bincount(drawn, minlength=3))


def test_budget_passes_by_hand_and_warning(data):
    rows = domain_budget(data, steps=12, batch_size=8)
    counts, _ = rows_per_domain(data, 96)
    for r, n, d in zip(rows, counts, data.domains):
        assert r["tokens_seen"] == n * 32
        assert r["passes"] == pytest.approx(n * 32 / data.num_tokens(d, "train"))
    text = budget_markdown({"a": rows})
    assert "Warning" not in text and text.count("| a |") == 3
    many = [dict(r, passes=WARN_PASSES + 1) for r in rows]
    assert "Warning" in budget_markdown({"b": many})


def test_expected_rows_past_exact_limit(data, monkeypatch):
    import moejax.analysis.budget as budget
    monkeypatch.setattr(budget, "EXACT_ROWS", 10)
    counts, exact = budget.rows_per_domain(data, 600)
    assert not exact
    np.testing.assert_allclose(counts, [300.0, 100.0, 200.0])
