"""memfl.run / estimate / measure / plan with a model and data shape memfl does not ship:
an MLP on flat feature vectors (N, F)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import memfl
from memfl.config import ConfigError
from memfl.data import DataError

F, K = 32, 4


def make_mlp(width: float = 1.0) -> nn.Module:
    h = max(2, int(256 * width))
    return nn.Sequential(nn.Linear(F, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, K))


def make_fixed() -> nn.Module:  # no width keyword
    return make_mlp()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, F, generator=g)
    y = x[:, :K].argmax(1)
    return (x[:240], y[:240]), (x[240:], y[240:])


TINY = dict(clients=6, per_round=3, rounds=2, max_steps=2, budgets="relative:0.2-1.1", seed=0)


def _run(method, data, tmp_path, **kw):
    train, test = data
    return memfl.run(make_mlp, train=train, test=test, method=method, out=tmp_path, **{**TINY, **kw})


def _changed(tmp_path) -> bool:
    final = load_file(str(tmp_path / "checkpoint.safetensors"))
    torch.manual_seed(TINY["seed"])
    init = make_mlp().state_dict()
    common = [k for k in init if k in final]
    assert common
    return any(not torch.equal(init[k], final[k]) for k in common)


def _ok(results):
    return [c for r in results["rounds"] for c in r["clients"] if c["status"] == "ok"]


@pytest.mark.parametrize("method", ["fedavg", "exclusive", "heterofl"])
def test_run_methods(method, data, tmp_path):
    res = _run(method, data, tmp_path)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert (tmp_path / "results.json").exists()
    assert res["config"]["run"]["method"] == method
    ok = _ok(res)
    assert ok and _changed(tmp_path)
    full = res["full_peak_bytes"]
    plans = {c["plan"] for c in ok}
    if method == "fedavg":
        assert plans == {"full"}
    elif method == "exclusive":  # only clients that fit the full model train
        assert plans == {"full"} and all(c["budget_bytes"] >= c["predicted_peak_bytes"] for c in ok)
        assert all(c["budget_bytes"] >= full for c in ok)
    else:  # heterofl: low-budget clients train width-scaled sub-models that fit
        assert any(p.startswith("width:") for p in plans)
        assert all(c["predicted_peak_bytes"] <= c["budget_bytes"] for c in ok)


def test_run_scalefl(data, tmp_path):
    res = _run("scalefl", data, tmp_path, scalefl={"blocks": 2})
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    ok = _ok(res)
    assert ok and all(c["plan"].startswith("stage:") for c in ok)
    assert _changed(tmp_path)


def test_run_fedhybrid(data, tmp_path):
    res = _run("fedhybrid", data, tmp_path)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    ok = _ok(res)
    assert ok and all(c["predicted_peak_bytes"] <= c["budget_bytes"] for c in ok)
    assert _changed(tmp_path)


def test_run_without_out_returns_dict(data):
    train, test = data
    res = memfl.run(make_mlp, train=train, test=test, **{**TINY, "rounds": 1})
    assert len(res["rounds"]) == 1 and res["rounds"][0]["accuracy"] is not None


def test_run_torch_dataset_and_tokens(tmp_path):
    """Token ids (N, T) int64 with an embedding model, given as a torch Dataset."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (120, 8), generator=g)
    y = x[:, 0] % 3
    train = torch.utils.data.TensorDataset(x[:96], y[:96])
    res = memfl.run(
        _make_tokens, train=train, test=(x[96:], y[96:]), method="fedavg", out=tmp_path, **{**TINY, "rounds": 1}
    )
    assert _ok(res) and res["full_peak_bytes"] > 0


def _make_tokens() -> nn.Module:
    return nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(8 * 16, 3))


def test_errors(data):
    train, test = data
    x, y = train
    with pytest.raises(TypeError, match="width"):
        memfl.run(make_fixed, train=train, test=test, method="heterofl", **TINY)
    with pytest.raises(ConfigError, match="clinets"):
        memfl.run(make_mlp, train=train, test=test, clinets=3)
    with pytest.raises(ConfigError, match="run.rounds"):
        memfl.run(make_mlp, train=train, test=test, rounds=0)
    with pytest.raises(ConfigError, match="scalefl.blocks"):
        memfl.run(make_mlp, train=train, test=test, method="scalefl", scalefl={"blocks": 0})
    with pytest.raises(DataError, match="integer"):
        memfl.run(make_mlp, train=(x, y.float()), test=test)
    with pytest.raises(DataError, match="labels"):
        memfl.run(make_mlp, train=(x, y[:-1]), test=test)
    with pytest.raises(DataError, match="per sample"):
        memfl.run(make_mlp, train=train, test=(test[0][:, :5], test[1]))
    with pytest.raises(ValueError, match="fails on the training inputs"):
        memfl.run(make_mlp, train=(x[:, :5], y), test=(test[0][:, :5], test[1]))
    with pytest.raises(TypeError, match="not a model instance"):
        memfl.run(make_mlp(), train=train, test=test)


def test_estimate_measure_plan():
    est = memfl.estimate(make_mlp(), (32, F))
    assert est.peak_bytes > est.parameters > 0
    assert memfl.estimate(make_mlp, (32, F)).peak_bytes == est.peak_bytes
    tok = memfl.estimate(_make_tokens(), (16, 8))  # integer ids, from the leading embedding
    assert tok.peak_bytes > 0
    meas = memfl.measure(make_mlp, (32, F), steps=1)
    assert meas.peak_bytes > 0
    res = memfl.plan(make_mlp, (32, F), "1.5x", timing=False)
    assert res.plan.kind == "full" and res.full_peak_bytes > 0


def test_the_example_runs_end_to_end(tmp_path):
    """examples/tabular_mlp.py as a user runs it: a fresh interpreter, its own working folder."""
    script = Path(__file__).resolve().parents[1] / "examples" / "tabular_mlp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "results" / "tabular_mlp" / "results.json").read_text())
    assert [e["round"] for e in results["rounds"]] == list(range(1, 11))
    plans = {c["plan"] for e in results["rounds"] for c in e["clients"]}
    assert any(p.startswith("width:") for p in plans)  # HeteroFL gave small clients sub-models
    assert results["summary"]["best_accuracy"] > 0.4  # 4 classes: chance is 0.25
    assert "estimated" in r.stdout and "measured" in r.stdout
    assert "no FedHybrid plan for 0.8x" in r.stdout or "plan for 0.8x" in r.stdout


def test_flower_local_needs_import_paths():
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    with pytest.raises(ValueError, match="import path"):
        memfl.run(lambda: torch.nn.Linear(4, 2), train=(x, y), test=(x, y), runtime="flower-local", clients=2)
    with pytest.raises(ValueError, match="cannot be imported"):
        memfl.run(lambda: torch.nn.Linear(4, 2), runtime="flower-local", clients=2, dataset="synthetic")
    with pytest.raises(ValueError, match="runtime"):
        memfl.run(lambda: torch.nn.Linear(4, 2), train=(x, y), test=(x, y), runtime="ray")


@pytest.mark.slow
def test_run_on_flower_with_an_import_path_model(tmp_path, monkeypatch):
    """memfl.run(runtime="flower-local"): a SuperLink + 2 SuperNodes on 127.0.0.1, whose ClientApps
    build the user's model and data from their import paths (tests/user_task.py)."""
    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    import user_task

    res = memfl.run(
        user_task.make_mlp,
        runtime="flower-local",
        dataset="user_task:load",
        clients=2,
        per_round=2,
        rounds=2,
        partition="iid",
        budgets="relative:1.5-2.0",
        max_steps=3,
        lr=0.1,
        out=tmp_path / "out",
    )
    assert res["runtime"] == "flower" and res["config"]["run"]["model"] == "user_task:make_mlp"
    assert [e["round"] for e in res["rounds"]] == [1, 2]
    assert all(c["status"] == "ok" for e in res["rounds"] for c in e["clients"])
    assert res["rounds"][-1]["accuracy"] > 1 / 3  # 3 classes
