"""Built-in fault injection (memfl.runtime.faults), the statuses and the round deadline."""

from __future__ import annotations

import argparse

import pytest
import torch

from memfl.config import ConfigError, FaultsConfig, build_config, parse_deadline, parse_faults, with_overrides
from memfl.core.protocol import Instruction, Result
from memfl.core.strategy import ClientInfo
from memfl.runtime.faults import (
    FAULT_KINDS,
    INFLATE_FACTOR,
    InjectedOOM,
    corrupt,
    draw_fault,
    fit_with_fault,
    is_oom_error,
)
from memfl.server.records import resolve_deadline, round_entry
from memfl.server.validate import Validator

#: what each injected fault must end as
EXPECTED_STATUS = {
    "crash": "failed",
    "nan": "rejected",
    "shape": "rejected",
    "inflate": "rejected",
    "oom": "oom",
    "hang": "timeout",
}


def test_draws_are_seeded_and_follow_the_rates():
    faults = FaultsConfig(crash=0.1, nan=0.1, shape=0.1, inflate=0.1, oom=0.1, hang=0.1)
    draws = [draw_fault(faults, 3, r, c) for r in range(1, 41) for c in range(50)]
    assert draws == [draw_fault(faults, 3, r, c) for r in range(1, 41) for c in range(50)]
    assert draws != [draw_fault(faults, 4, r, c) for r in range(1, 41) for c in range(50)]
    for kind in FAULT_KINDS:
        assert 0.07 < draws.count(kind) / len(draws) < 0.13, kind
    assert 0.36 < draws.count(None) / len(draws) < 0.44
    assert draw_fault(FaultsConfig(), 3, 1, 1) is None
    assert all(draw_fault(FaultsConfig(hang=1.0), 0, r, 0) == "hang" for r in range(1, 20))


def test_fault_config_and_flag():
    assert parse_faults("crash:0.05, nan:0.1,hang") == {"crash": 0.05, "nan": 0.1, "hang": 1.0}
    with pytest.raises(ConfigError, match="unknown fault 'boom'"):
        parse_faults("boom:0.1")
    with pytest.raises(ConfigError, match="needs a probability"):
        parse_faults("crash:lots")
    with pytest.raises(ConfigError, match="add up to more than 1"):
        build_config({"faults": {"crash": 0.7, "oom": 0.4}})
    with pytest.raises(ConfigError, match="faults.nan"):
        build_config({"faults": {"nan": -0.1}})

    from memfl.cli.common import add_run_flags, config_from_args

    p = argparse.ArgumentParser()
    add_run_flags(p)
    args = p.parse_args(["--faults", "crash:0.05,nan:0.05,shape:0.05,inflate:0.05,oom:0.05,hang:0.05"])
    args.round_deadline, args.aggregation = "2x", "median"
    config = config_from_args(args)
    assert config.faults.rates() == dict.fromkeys(FAULT_KINDS, 0.05)
    assert config.run.round_deadline == "2x" and config.aggregation.rule == "median"


def test_deadline_spec():
    assert parse_deadline(None) is None and parse_deadline("none") is None
    assert parse_deadline("2x") == ("factor", 2.0)
    assert parse_deadline(30) == ("seconds", 30.0) == parse_deadline("30s") == parse_deadline("30")
    for bad in ("0.5x", "-3", "soon", "0"):
        with pytest.raises(ValueError):
            parse_deadline(bad)
    with pytest.raises(ConfigError, match="run.round_deadline"):
        build_config({"run": {"round_deadline": "soon"}})


def _ins(budget=1000) -> Instruction:
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}
    return Instruction(round=1, client_id=2, params=params, trainable=["w", "b"], seed=11, budget_bytes=budget)


def _fit() -> Result:
    params = {"w": torch.ones(3, 2), "b": torch.ones(3), "n": torch.tensor(1)}
    return Result(client_id=2, params=params, num_samples=20, loss=0.5)


def test_every_fault_ends_with_its_status():
    ins = _ins()
    client = ClientInfo(id=2, num_samples=20, device="phone", speed=1.0, budget_bytes=1000)
    validator = Validator(lambda plan: torch.nn.Linear(2, 3))  # buffers: none; "n" is not allowed
    ins.trainable = ["w", "b"]
    for kind, status in EXPECTED_STATUS.items():
        out = fit_with_fault(ins, _fit, kind, real_budget_bytes=77)
        assert out.fault == kind and out.real_budget_bytes == 77
        if status in ("rejected",):
            assert out.status == "ok"
            clean = {k: v for k, v in out.result.params.items() if k != "n"}
            reason = validator.check(ins, client, Result(**{**out.result.__dict__, "params": clean}))
            assert reason is not None, kind
        else:
            assert out.status == status, (kind, out)
    plain = fit_with_fault(ins, _fit, None)
    assert plain.status == "ok" and plain.fault is None


def test_corruptions():
    r = _fit()
    nan = corrupt("nan", r, 5)
    assert sum(int(torch.isnan(t).sum()) for t in nan.params.values() if t.dtype.is_floating_point) == 1
    shape = corrupt("shape", r, 5)
    assert any(shape.params[k].shape != r.params[k].shape for k in r.params)
    assert corrupt("inflate", r, 5).num_samples == 20 * INFLATE_FACTOR
    assert torch.equal(r.params["w"], torch.ones(3, 2)) and r.num_samples == 20  # the original untouched
    assert corrupt("crash", r, 5) is r


def test_real_allocation_failures_are_oom():
    assert is_oom_error(InjectedOOM("x")) and is_oom_error(MemoryError())
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom_error(RuntimeError("shape mismatch"))

    def boom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    assert fit_with_fault(_ins(), boom, None).status == "oom"
    assert fit_with_fault(_ins(), lambda: 1 / 0, None).status == "failed"


# -- the round deadline -------------------------------------------------------------------------


def _records():
    return [
        {"id": 0, "status": "ok", "virtual_seconds": 4.0},
        {"id": 1, "status": "ok", "virtual_seconds": 10.0},
        {"id": 2, "status": "rejected", "virtual_seconds": 6.0},
        {"id": 3, "status": "timeout"},
        {"id": 4, "status": "failed"},
    ]


def test_a_silent_client_costs_the_deadline():
    recs = _records()
    d = resolve_deadline(recs, ("factor", 2.0), None)
    assert d == 20.0  # twice the slowest answering client
    e = round_entry(1, recs, {}, None, None, 5.0, d)
    assert e["round_virtual_seconds"] == 20.0 and e["answered_virtual_seconds"] == 10.0
    assert e["virtual_seconds"] == 25.0
    assert e["statuses"] == {"ok": 2, "rejected": 1, "timeout": 1, "failed": 1}
    # no deadline ("costs nothing"): the slowest answering client
    free = round_entry(1, _records(), {}, None, None, 5.0, resolve_deadline(_records(), None, None))
    assert free["round_virtual_seconds"] == 10.0 and free["deadline_seconds"] is None
    # nobody silent: the deadline costs nothing
    answered = [r for r in _records() if r["status"] != "timeout"]
    assert round_entry(1, answered, {}, None, None, 0.0, 20.0)["round_virtual_seconds"] == 10.0
    # nobody answered: a factor deadline falls back on the previous round's expected time
    assert resolve_deadline([{"id": 3, "status": "oom"}], ("factor", 3.0), 2.0) == 6.0


def test_a_fixed_deadline_times_out_late_answers():
    recs = _records()
    assert resolve_deadline(recs, ("seconds", 8.0), None) == 8.0
    assert recs[1]["status"] == "timeout" and "after the 8 s deadline" in recs[1]["error"]
    assert recs[0]["status"] == "ok"
    e = round_entry(1, recs, {}, None, None, 0.0, 8.0)
    assert e["round_virtual_seconds"] == 8.0 and e["answered_virtual_seconds"] == 6.0


# -- end to end ---------------------------------------------------------------------------------

ALL_FAULTS = {kind: 0.12 for kind in FAULT_KINDS}


def test_a_run_with_every_fault_at_once(small_config):
    from safetensors.torch import load_file

    from memfl.runtime.sim import run_experiment

    config = with_overrides(
        small_config(clients=12, per_round=8, rounds=3),
        {**{f"faults.{k}": v for k, v in ALL_FAULTS.items()}, "run.round_deadline": "2x"},
    )
    res = run_experiment(config, progress=False)
    seen = set()
    for rnd in res["rounds"]:
        for c in rnd["clients"]:
            expected = draw_fault(config.faults, config.run.seed, rnd["round"], c["id"])
            assert c.get("fault") == expected  # every injected fault recorded, with its kind
            if expected:
                seen.add(expected)
                assert c["status"] == EXPECTED_STATUS[expected], c
            else:
                assert c["status"] == "ok", c
        if rnd["statuses"].get("timeout") or rnd["statuses"].get("oom"):
            assert rnd["round_virtual_seconds"] >= rnd["answered_virtual_seconds"]
            assert rnd["round_virtual_seconds"] == pytest.approx(2 * rnd["answered_virtual_seconds"])
    assert seen == set(FAULT_KINDS), seen  # the seed gives every kind at least once
    summary = res["summary"]
    assert sum(summary["faults"].values()) == sum(1 for r in res["rounds"] for c in r["clients"] if "fault" in c)
    assert summary["virtual_seconds"] > summary["virtual_seconds_no_deadline"]
    params = load_file(str(config.run.out) + "/checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in params.values() if t.dtype.is_floating_point)
    assert summary["final_accuracy"] is not None
