"""Fixtures shared by the tests of the sparse layers."""

import pytest

from dynasparse.nn import costs


@pytest.fixture
def cost_model(tmp_path, monkeypatch):
    """A fresh cost model on its own file; `timings` = (sparse_s, dense_s) the timer reports."""
    model = costs.use_cost_file(tmp_path / "costs.json")
    state = {"timings": (1.0, 2.0), "measured": 0}

    def fake_time_both(sparse, dense, device):
        sparse(), dense()  # both ways still run: a failing way must fail here too
        state["measured"] += 1
        return state["timings"]

    monkeypatch.setattr(costs, "time_both", fake_time_both)
    yield model, state
    costs.use_cost_file(None)
