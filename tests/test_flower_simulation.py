"""memfl's Flower apps on Flower's own simulation engine (optional: needs ``flwr[simulation]``,
i.e. ray; skipped without it, and slow: Ray starts its own processes)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray")


@pytest.mark.slow
def test_memfl_apps_run_on_flowers_simulation_engine(tmp_path):
    from memfl.config import build_config
    from memfl.runtime.flower.simulation import run

    cfg = build_config(
        {
            "run": {
                "method": "fedavg",
                "model": "cnn",
                "model_width": 0.25,
                "dataset": "synthetic",
                "clients": 4,
                "per_round": 2,
                "rounds": 2,
                "partition": "iid",
                "out": str(tmp_path / "run"),
            },
            "train": {"max_steps": 2},
        }
    )
    run(cfg)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(c["status"] == "ok" for r in res["rounds"] for c in r["clients"])
    assert res["rounds"][-1]["accuracy"] is not None
    assert len(res["clients"]) == 4  # every simulated SuperNode answered the node query
