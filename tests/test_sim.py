"""The in-process simulator end to end on small synthetic data."""

import json

import pytest
import torch

from memfl.core.protocol import HyperParams, Instruction, Plan
from memfl.core.trainer import LocalTrainer
from memfl.runtime.sim import run_experiment


def _params_of(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint.safetensors"))


def test_fedavg_run_writes_results_and_learns(small_config):
    cfg = small_config(rounds=3, per_round=3)
    res = run_experiment(cfg, progress=False)
    out = cfg.run.out
    data = json.loads(open(f"{out}/results.json").read())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert all(r["accuracy"] is not None for r in data["rounds"])
    for r in data["rounds"]:
        assert len(r["clients"]) == 3
        for c in r["clients"]:
            assert {"id", "budget_bytes", "plan", "predicted_peak_bytes", "compute_seconds"} <= set(c)
            assert c["plan"] == "full" and c["status"] == "ok" and c["compute_seconds"] > 0
        assert r["round_virtual_seconds"] == max(c["virtual_seconds"] for c in r["clients"])
    # synthetic data is learnable: better than chance (10 classes) after 3 short rounds
    assert res["summary"]["final_accuracy"] > 0.2
    assert cfg.run.out and __import__("pathlib").Path(out, "accuracy.png").stat().st_size > 1000


def test_deterministic_for_a_seed(small_config, tmp_path):
    a = run_experiment(small_config(out=str(tmp_path / "a")), progress=False)
    b = run_experiment(small_config(out=str(tmp_path / "b")), progress=False)
    assert [c["id"] for r in a["rounds"] for c in r["clients"]] == [c["id"] for r in b["rounds"] for c in r["clients"]]
    pa, pb = _params_of(tmp_path / "a"), _params_of(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_exclusive_only_selects_clients_that_fit(small_config):
    cfg = small_config(method="exclusive", budgets="relative:0.1-1.1", clients=10, per_round=10, rounds=1)
    res = run_experiment(cfg, progress=False)
    full = res["full_peak_bytes"]
    chosen = res["rounds"][0]["clients"]
    fits = [c["id"] for c in res["clients"] if c["budget_bytes"] >= full]
    assert sorted(c["id"] for c in chosen) == sorted(fits)
    assert 0 < len(fits) < 10  # the budget range straddles the full peak
    assert all(c["budget_bytes"] >= c["predicted_peak_bytes"] for c in chosen)
    assert res["rounds"][0]["eligible_clients"] == len(fits)  # every method records who could take part


def test_eligible_clients_counts_fitting_plans_for_every_method(small_config):
    """A memory-unaware plan (fedavg: full training for everyone) counts only where it fits."""
    cfg = small_config(method="fedavg", budgets="relative:0.1-1.1", clients=10, per_round=2, rounds=1)
    res = run_experiment(cfg, progress=False)
    fits = sum(c["budget_bytes"] >= res["full_peak_bytes"] for c in res["clients"])
    assert res["rounds"][0]["eligible_clients"] == fits < 10


def test_killed_run_resumes_identically(small_config, tmp_path):
    full = run_experiment(small_config(rounds=3, out=str(tmp_path / "full")), progress=False)

    class Kill(Exception):
        pass

    def die_after_two(entry):
        if entry["round"] == 2:
            raise Kill

    cfg = small_config(rounds=3, out=str(tmp_path / "resumed"))
    with pytest.raises(Kill):
        run_experiment(cfg, progress=False, on_round=die_after_two)
    resumed = run_experiment(cfg, progress=False)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][2]["accuracy"] == full["rounds"][2]["accuracy"]
    pa, pb = _params_of(tmp_path / "full"), _params_of(tmp_path / "resumed")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_a_different_config(small_config, tmp_path):
    from memfl.config import ConfigError

    run_experiment(small_config(rounds=1, out=str(tmp_path / "r")), progress=False)
    with pytest.raises(ConfigError, match="different configuration"):
        run_experiment(small_config(rounds=1, seed=5, out=str(tmp_path / "r")), progress=False)


def test_a_failing_client_does_not_kill_the_run(small_config, monkeypatch):
    original = LocalTrainer.fit

    def flaky(self, ins, x, y):
        if ins.client_id % 2 == 0:
            raise RuntimeError("simulated out-of-memory")
        return original(self, ins, x, y)

    monkeypatch.setattr(LocalTrainer, "fit", flaky)
    res = run_experiment(small_config(rounds=2, per_round=4), progress=False)
    statuses = [c["status"] for r in res["rounds"] for c in r["clients"]]
    assert "failed" in statuses and "ok" in statuses
    failed = [c for r in res["rounds"] for c in r["clients"] if c["status"] == "failed"]
    assert all("simulated out-of-memory" in c["error"] for c in failed)
    assert res["summary"]["failed_clients"] == len(failed)


def test_trainer_returns_trainable_and_buffers_and_changes_them():
    from memfl.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", width=0.25)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = LocalTrainer(lambda plan: build_model("cnn", width=0.25))
    ins = Instruction(
        round=1,
        client_id=0,
        params=params,
        trainable=[n for n, _ in model.named_parameters()],
        plan=Plan(),
        hparams=HyperParams(batch_size=8, lr=0.1, max_steps=3),
        seed=3,
    )
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    res = trainer.fit(ins, x, y)
    assert set(res.params) == set(params)  # all parameters and BN buffers come back
    assert res.steps == 3 and res.num_samples == 40 and len(res.sample_losses) > 0
    changed = [k for k in params if params[k].dtype.is_floating_point and not torch.equal(params[k], res.params[k])]
    assert len(changed) == sum(1 for k in params if params[k].dtype.is_floating_point)
    # the same instruction gives the same result
    again = trainer.fit(ins, x, y)
    assert all(torch.equal(res.params[k], again.params[k]) for k in res.params)


def test_fedprox_term_pulls_towards_the_global_model():
    from memfl.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", width=0.25)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    trainer = LocalTrainer(lambda plan: build_model("cnn", width=0.25))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def drift(mu):
        ins = Instruction(
            round=1,
            client_id=0,
            params=params,
            trainable=names,
            hparams=HyperParams(batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, prox_mu=mu, local_epochs=3),
            seed=1,
        )
        res = trainer.fit(ins, x, y)
        return sum(float((res.params[k] - params[k]).pow(2).sum()) for k in names)

    assert drift(10.0) < drift(0.0)


def test_a_finished_run_can_be_extended_but_not_shrunk(small_config, tmp_path):
    from memfl.config import ConfigError

    out = str(tmp_path / "x")
    run_experiment(small_config(rounds=1, out=out), progress=False)
    longer = run_experiment(small_config(rounds=2, out=out), progress=False)
    assert [r["round"] for r in longer["rounds"]] == [1, 2]
    with pytest.raises(ConfigError, match="already holds 2 rounds"):
        run_experiment(small_config(rounds=1, out=out), progress=False)


def test_the_round_loop_drives_any_executor(small_config):
    """The shared loop (memfl.server.loop) with an executor that is not the simulator's: every
    record has the same fields, runtime extras are added, a failed outcome is left out."""
    from pathlib import Path

    from memfl.core.trainer import LocalTrainer as Trainer
    from memfl.runtime.sim import InProcessExecutor
    from memfl.server.checkpoint import Checkpoint
    from memfl.server.executor import Outcome
    from memfl.server.loop import run_rounds
    from memfl.server.progress import LogReporter
    from memfl.server.setup import build_federation, load_data, set_up_server

    cfg = small_config(rounds=1, per_round=4)
    data = load_data(cfg)
    Path(cfg.run.out).mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(Path(cfg.run.out))
    setup = set_up_server(cfg, data.input_shape, data.num_classes, checkpoint)

    class Remote(InProcessExecutor):
        runtime = "remote"

        def run(self, round, instructions):
            outs = super().run(round, instructions)
            outs[0] = Outcome(outs[0].client_id, "failed", error="link down", where="host a")
            for o in outs:
                o.extra["host"] = "a"
            return outs

    lines = []
    ex = Remote(build_federation(cfg, data, setup.full_peak), Trainer(setup.model_fn), None)
    res = run_rounds(cfg, setup, checkpoint, ex, test=data, reporter=LogReporter(lines.append))
    recs = res["rounds"][0]["clients"]
    assert res["runtime"] == "remote" and len(recs) == 4
    assert recs[0]["status"] == "failed" and recs[0]["error"] == "link down"
    assert any("(host a) failed: link down" in line for line in lines)
    assert all(r["host"] == "a" and r["predicted_budget_bytes"] == r["budget_bytes"] for r in recs)
    assert "real_budget_bytes" not in recs[0] and res["summary"]["failed_clients"] == 1
    assert res["rounds"][0]["accuracy"] is not None and "run_seconds" in res["rounds"][0]["timing"]


def test_a_server_killed_with_sigkill_mid_run_resumes_to_the_same_model(tmp_path):
    """The real thing: `memfl run` as a process, SIGKILLed (no cleanup, no exception handler) while
    it trains round 3; the same command again resumes from the last checkpoint and ends with the
    uninterrupted run's parameters, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def command(out):
        return [
            sys.executable,
            "-m",
            "memfl.cli",
            "run",
            "--method",
            "fedavg",
            "--model",
            "cnn",
            "--model-width",
            "0.25",
            "--dataset",
            "synthetic",
            "--clients",
            "8",
            "--per-round",
            "4",
            "--rounds",
            "6",
            "--partition",
            "iid",
            "--budgets",
            "relative:0.5-1.5",
            "--seed",
            "2",
            "--max-steps",
            "20",
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--quiet",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(command(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint.json"
    deadline = time.monotonic() + 300
    try:  # kill it once round 2 is checkpointed, i.e. while it works on round 3
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists():
                try:
                    done = len(json.loads(state.read_text())["rounds"])
                except (ValueError, KeyError):  # caught between write and rename: read again
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = len(json.loads(state.read_text())["rounds"])
    assert 2 <= killed_at < 6

    again = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {out} after round {killed_at}" in " ".join(again.stderr.split())
    a, b = load_file(str(tmp_path / "full" / "checkpoint.safetensors")), load_file(str(out / "checkpoint.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
