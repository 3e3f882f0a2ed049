"""Enforced budgets on CUDA (memfl.runtime.cuda_cap): the guards run everywhere, the cap itself only
where a CUDA device is (CI has none)."""

from __future__ import annotations

import pytest
import torch

from memfl.config import build_config
from memfl.core.trainer import LocalTrainer
from memfl.models import build_model
from memfl.runtime.cuda_cap import _tried, cuda_budget_cap
from memfl.runtime.sim import InProcessExecutor, run_experiment

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(out: str, device: str, budgets: str) -> object:
    return build_config(
        {
            "run": {
                "method": "fedavg",
                "model": "cnn",
                "model_width": 0.5,
                "dataset": "synthetic",
                "clients": 6,
                "per_round": 3,
                "rounds": 2,
                "partition": "iid",
                "budgets": budgets,
                "seed": 1,
                "out": out,
                "device": device,
                "enforce_budgets": True,
            },
            "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "max_steps": 3},
        }
    )


def test_the_in_process_executor_refuses_a_cpu_cap():
    trainer = LocalTrainer(lambda plan: build_model("cnn", width=0.25), device="cpu")
    with pytest.raises(ValueError, match="worker pool"):
        InProcessExecutor([], trainer, None, enforce=True)


def test_a_cuda_cap_on_a_cpu_device_is_an_error():
    with pytest.raises(ValueError, match="not a CUDA device"):
        cuda_budget_cap(2**20, "cpu")


def test_the_failed_request_is_read_from_torchs_message():
    msg = "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)"
    assert _tried(msg) == 20 * 2**20
    assert _tried("Tried to allocate 512 B") == 512
    assert _tried("something else") == 0


@needs_cuda
def test_a_cuda_client_over_its_enforced_budget_is_oom_and_the_run_goes_on(tmp_path):
    tight = run_experiment(_config(str(tmp_path / "tight"), "cuda", "relative:0.3-0.3"), progress=False)
    assert len(tight["rounds"]) == 2  # the run went on
    for r in tight["rounds"]:
        for c in r["clients"]:
            assert c["status"] == "oom", c
            assert "out of memory" in c["error"].lower(), c
            assert c["enforced_cap_bytes"] == c["worker_baseline_bytes"] + c["enforced_budget_bytes"]
    roomy = run_experiment(_config(str(tmp_path / "roomy"), "cuda", "relative:3-3"), progress=False)
    for r in roomy["rounds"]:
        for c in r["clients"]:
            assert c["status"] == "ok", c
            assert 0 < c["measured_peak_bytes"] <= c["enforced_budget_bytes"], c
    # the whole device again after the capped clients: 256 MiB is far above any of their caps
    assert torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda").numel() == 256 * 2**20
