"""The worker-pool executor (memfl.runtime.pool): parallel workers give the sequential run's
parameters bit for bit (same thread count), the test-set evaluation split over workers gives the
same numbers, an enforced budget turns a real overshoot into ``oom``, and a worker killed with
SIGKILL mid-round is replaced while its client is recorded failed."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from memfl.config import build_config
from memfl.core.trainer import LocalTrainer, evaluate
from memfl.runtime.pool import WorkerPoolExecutor, budget_cap, pool_shape
from memfl.runtime.sim import run_experiment

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the pool forks its workers")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the sequential run uses the workers' thread count: bit-identity
    yield
    torch.set_num_threads(before)


def _params(cfg):
    return load_file(os.path.join(cfg.run.out, "checkpoint.safetensors"))


@pytest.mark.parametrize("method", ["fedavg", "heterofl"])
def test_two_workers_give_the_sequential_parameters_and_evaluation(small_config, tmp_path, one_thread, method):
    seq = small_config(method=method, out=str(tmp_path / "seq"))
    par = small_config(method=method, out=str(tmp_path / "par"), workers=2)
    a = run_experiment(seq, progress=False)
    b = run_experiment(par, progress=False)
    pa, pb = _params(seq), _params(par)
    assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert (ra["accuracy"], ra["loss"]) == (rb["accuracy"], rb["loss"])  # exact: counts and the same sum
        assert [(c["id"], c["plan"], c["status"]) for c in ra["clients"]] == [
            (c["id"], c["plan"], c["status"]) for c in rb["clients"]
        ]
    pids = {c["worker_pid"] for r in b["rounds"] for c in r["clients"]}
    assert len(pids) == 2 and os.getpid() not in pids  # trained in the two workers


def _pool(small_config, tmp_path, workers=2, repeat_test=1, **kw):
    from memfl.server.checkpoint import Checkpoint
    from memfl.server.setup import build_federation, load_data, set_up_server

    cfg = small_config(out=str(tmp_path / "p"))
    data = load_data(cfg)
    setup = set_up_server(cfg, data.input_shape, data.num_classes, Checkpoint(tmp_path / "p"), example=data.example)
    clients = build_federation(cfg, data, setup.full_peak)
    data.test_x, data.test_y = torch.cat([data.test_x] * repeat_test), torch.cat([data.test_y] * repeat_test)
    pool = WorkerPoolExecutor(
        clients,
        LocalTrainer(setup.model_fn),
        None,
        workers=workers,
        eval_model=setup.global_model,
        test_x=data.test_x,
        test_y=data.test_y,
        **kw,
    )
    return cfg, data, setup, pool


def test_split_evaluation_matches_one_process(small_config, tmp_path, one_thread):
    # 2500 test samples: three workers, batches of 1000 -> uneven shares, the last batch short
    cfg, data, setup, pool = _pool(small_config, tmp_path, workers=3, repeat_test=5)
    x, y = data.test_x, data.test_y
    assert len(x) == 2500
    with pool:
        split = pool.evaluate(setup.params, x, y)
        assert pool.evaluate(setup.params, x[:10], y[:10]) is None  # not the pool's test set
    setup.global_model.load_state_dict(setup.params)
    assert split == evaluate(setup.global_model, x, y)


def test_a_worker_killed_mid_round_is_replaced_and_its_client_fails(small_config, tmp_path, monkeypatch):
    victim = {}
    real_fit = LocalTrainer.fit

    def fit(self, ins, x, y):  # inherited by the forked workers
        if ins.client_id == victim.get("id") and ins.round == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-round, mid-training
        return real_fit(self, ins, x, y)

    monkeypatch.setattr(LocalTrainer, "fit", fit)
    cfg = small_config(workers=2, rounds=2)
    from memfl.core.seeding import round_seed  # noqa: F401  -- selection is seeded: find round 1's clients

    first = run_experiment(small_config(out=str(tmp_path / "probe"), rounds=1), progress=False)
    victim["id"] = first["rounds"][0]["clients"][1]["id"]
    res = run_experiment(cfg, progress=False)
    r1 = {c["id"]: c for c in res["rounds"][0]["clients"]}
    assert r1[victim["id"]]["status"] == "failed"
    assert "worker process died (signal 9)" in r1[victim["id"]]["error"]
    assert all(c["status"] == "ok" for cid, c in r1.items() if cid != victim["id"])
    assert all(c["status"] == "ok" for c in res["rounds"][1]["clients"])  # the replacement trains round 2
    assert res["rounds"][1]["accuracy"] is not None


def test_enforced_budget_turns_a_real_overshoot_into_oom_and_the_run_goes_on(small_config, tmp_path):
    # relative budgets far below the measured need: every plan overshoots; generous ones all fit
    from memfl.config import with_overrides

    # a whole client's share in one batch: tens of MB of activations against a budget of about 1 MB
    tight_cfg = small_config(out=str(tmp_path / "tight"), enforce_budgets=True, budgets="relative:0.2-0.4")
    tight = run_experiment(with_overrides(tight_cfg, {"train.batch_size": 512}), progress=False)
    for c in tight["rounds"][0]["clients"]:
        assert c["status"] == "oom", c
        assert any(m in c["error"] for m in ("can't allocate memory", "MemoryError", "could not create a primitive"))
        assert c["measured_peak_bytes"] > c["enforced_budget_bytes"] * 0.5
        assert c["enforced_cap_bytes"] == c["worker_baseline_bytes"] + c["enforced_budget_bytes"]
    assert len(tight["rounds"]) == 2  # the run went on
    roomy = run_experiment(
        small_config(out=str(tmp_path / "roomy"), enforce_budgets=True, budgets="relative:20-40"), progress=False
    )
    for r in roomy["rounds"]:
        for c in r["clients"]:
            assert c["status"] == "ok", c
            assert 0 < c["measured_peak_bytes"] < c["enforced_budget_bytes"]


_CAP_RUN = r"""
import json, sys
from memfl.config import build_config
from memfl.runtime.sim import run_experiment
k, out = float(sys.argv[1]), sys.argv[2]
cfg = build_config({
    "run": {"method": "fedavg", "model": "cnn", "dataset": "synthetic", "clients": 6, "per_round": 3, "rounds": 1,
            "partition": "iid", "budgets": f"relative:{k}-{k}", "seed": 1, "out": out, "model_width": 0.5,
            "enforce_budgets": True, "workers": 1},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "max_steps": 3},
})
res = run_experiment(cfg, progress=False)
print(json.dumps(res["rounds"][0]["clients"]))
"""


def test_the_enforced_cap_follows_the_predicted_peak(tmp_path):
    """With the pool's fixed mmap threshold the OS cap agrees with the estimate: full-plan clients
    train under 1.1x their predicted peak and fail under 0.8x (cnn width 0.5, batch 32: 10 MB
    predicted; with glibc's default allocator they needed about 2x, see memfl.runtime.pool).

    Each run is a fresh process, as ``memfl run`` is: a process that has trained bigger batches
    before keeps runtime buffers (oneDNN, MKL, freed heap) that its forked workers reuse without
    growing their data segment, and the cap is then looser by that much (see the pool's docs)."""
    import json
    import subprocess
    import sys

    def run(k: float) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-c", _CAP_RUN, str(k), str(tmp_path / f"k{k}")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    roomy, tight = run(1.1), run(0.8)
    assert [c["status"] for c in roomy] == ["ok"] * 3, roomy
    assert [c["status"] for c in tight] == ["oom"] * 3, tight
    for c in roomy:
        assert c["enforced_budget_bytes"] == c["budget_bytes"]
        assert c["enforced_cap_bytes"] == c["worker_baseline_bytes"] + c["budget_bytes"]


def test_budget_cap_in_this_process_raises_a_catchable_error_and_is_restored():
    import resource

    before = resource.getrlimit(resource.RLIMIT_DATA)
    pid = os.fork()  # never cap the test process itself
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)  # a forked child cannot use the parent's OpenMP pool
            with budget_cap(64 * 2**20) as cap:
                try:
                    torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
                except RuntimeError as err:
                    code = 0 if "can't allocate memory" in str(err) and cap.cap_bytes > 0 else 2
            if resource.getrlimit(resource.RLIMIT_DATA) != before:
                code = 3
            torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)  # restored: fits again
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_pool_shape_and_flags():
    cfg = build_config({"run": {"workers": 4}})
    assert pool_shape(cfg, cores=8) == (4, 2)
    assert pool_shape(build_config({"run": {"workers": "auto"}}), cores=2) == (2, 1)
    assert pool_shape(build_config({}), cores=8) == (8, 1)  # default auto: one worker per core
    assert pool_shape(build_config({}), cores=1) is None  # one core: in process
    assert pool_shape(build_config({"run": {"workers": 1}}), cores=8) is None  # 1: in process
    assert pool_shape(build_config({"run": {"device": "cuda"}}), cores=8) is None  # CUDA: in process
    assert pool_shape(build_config({"run": {"enforce_budgets": True, "workers": 1}}), cores=2) == (
        1,
        2,
    )  # a cap: a worker
    assert pool_shape(build_config({"run": {"workers": 2, "device": "cuda"}}), cores=2) is None
    import argparse

    from memfl.cli.common import add_run_flags, config_from_args

    p = argparse.ArgumentParser()
    add_run_flags(p)
    cfg = config_from_args(p.parse_args(["--workers", "auto", "--enforce-budgets"]))
    assert cfg.run.workers == "auto" and cfg.run.enforce_budgets
    with pytest.raises(SystemExit):
        p.parse_args(["--workers", "0"])
