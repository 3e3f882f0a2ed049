import os

import pytest
import torch

# keep test runs on 2 cores predictable
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def small_config(tmp_path):
    """A tiny but complete experiment: synthetic data, 6 clients, 2 rounds, a few local steps."""
    from memfl.config import build_config

    def make(**run):
        cfg = {
            "run": {
                "method": "fedavg",
                "model": "cnn",
                "dataset": "synthetic",
                "clients": 6,
                "per_round": 3,
                "rounds": 2,
                "partition": "iid",
                "budgets": "relative:0.5-1.5",
                "seed": 1,
                "out": str(tmp_path / "run"),
                "model_width": 0.25,
                **run,
            },
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "max_steps": 4},
        }
        return build_config(cfg)

    return make
