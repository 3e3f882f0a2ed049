"""Checkpoints: the global model and the results so far, written atomically after every round,
so that a killed run started again with the same config resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memfl.config import Config, ConfigError

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


def _same_experiment(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``current`` continues the run ``saved`` describes: every saved setting but
    ``run.rounds`` is unchanged (settings a newer memfl added, absent from ``saved``, are ignored)."""
    for section, values in saved.items():
        now = current.get(section, {})
        for key, value in values.items():
            if (section, key) != ("run", "rounds") and now.get(key) != value:
                return False
    return True


class Checkpoint:
    """The global model + results so far in ``out``; written atomically after every round.

    Loading checks that the folder holds the same experiment (any setting but ``run.rounds`` may
    not change), so a finished run can also be extended by asking for more rounds.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tensors = out / CHECKPOINT_TENSORS
        self.state = out / CHECKPOINT_STATE

    def load(self, config: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not self.state.exists():
            return None
        from safetensors.torch import load_file

        state = json.loads(self.state.read_text())
        if not _same_experiment(state.get("config", {}), config.to_json()):
            raise ConfigError(
                f"{self.out} holds a run with a different configuration; "
                "use another --out folder, or delete that folder to start over"
            )
        if len(state["rounds"]) > config.run.rounds:
            raise ConfigError(
                f"{self.out} already holds {len(state['rounds'])} rounds, more than run.rounds = "
                f"{config.run.rounds}; ask for at least that many rounds or use another --out folder"
            )
        return load_file(str(self.tensors)), state

    def save(self, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp_t = self.tensors.with_name(self.tensors.name + ".tmp")
        tmp_s = self.state.with_name(self.state.name + ".tmp")
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp_t))
        tmp_s.write_text(json.dumps(state))
        tmp_t.replace(self.tensors)
        tmp_s.replace(self.state)
