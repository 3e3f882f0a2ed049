"""The Flower app: its ``pyproject.toml`` and the run config both apps read.

``flwr run`` needs an app folder holding a ``pyproject.toml``; memfl's is generated (``memfl flower
app --out DIR``) and points Flower at the ServerApp and ClientApp inside the installed ``memfl``
package, so the folder holds no code of its own. Its ``[tool.flwr.app.config]`` table is the run
config, which Flower hands to both apps (``context.run_config``, flattened to dotted keys):

- ``memfl.run.*`` and ``memfl.train.*``: the memfl :class:`~memfl.config.Config`, exactly the
  ``[run]`` / ``[train]`` tables of ``memfl run --config`` (keys left out take their defaults);
  override one with ``flwr run DIR CONN --run-config 'memfl.run.rounds=10'``;
- the runtime's own keys (:data:`RUNTIME_DEFAULTS`): how long the server waits for nodes and
  replies, and how often it polls the SuperLink.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from memfl.config import Config, build_config

#: runtime keys of the run config -> default
RUNTIME_DEFAULTS: dict[str, float | int] = {
    "min-nodes": 1,  # nodes to wait for before round 1 ...
    "wait-nodes": 120.0,  # ... for at most this many seconds (then go on with those online)
    "query-timeout": 60.0,  # seconds a node has to answer the node-info query
    "round-timeout": 600.0,  # seconds a round waits for train replies; later ones count as failed
    "poll-interval": 0.2,  # seconds between the server's polls of the SuperLink for replies
}

APP_NAME = "memfl-flower"
PUBLISHER = "memfl"
SERVER_APP = "memfl.runtime.flower.server_app:app"
CLIENT_APP = "memfl.runtime.flower.client_app:app"


@dataclass(frozen=True)
class AppSettings:
    """The run config, typed: the memfl config and the runtime's waits and timeouts."""

    config: Config
    min_nodes: int = 1
    wait_nodes: float = 120.0
    query_timeout: float = 60.0
    round_timeout: float = 600.0
    poll_interval: float = 0.2

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppSettings":
        """Read Flower's (flattened) run config; unknown ``memfl.*`` keys are refused by name."""
        nested: dict[str, Any] = {}
        for key, value in run_config.items():
            if key.startswith("memfl."):
                parts = key.split(".")[1:]
                d = nested
                for part in parts[:-1]:
                    d = d.setdefault(part, {})
                d[parts[-1]] = value
        _decode_lists(nested)
        config = build_config(nested, source="Flower run config (memfl.*)")
        kw = {}
        for key, default in RUNTIME_DEFAULTS.items():
            value = run_config.get(key, default)
            kw[key.replace("-", "_")] = type(default)(value)
        return cls(config=config, **kw)

    def to_run_config(self) -> dict[str, Any]:
        """Flat ``{dotted key: value}`` as Flower hands it to the apps (None values left out)."""
        flat: dict[str, Any] = {k: getattr(self, k.replace("-", "_")) for k in RUNTIME_DEFAULTS}
        for section, table in self.config.to_json(set_only=True).items():
            for key, value in table.items():
                if value is not None:
                    flat[f"memfl.{section}.{key}"] = _encode(value)
        return flat


def _encode(value: Any) -> Any:
    """Flower's run config holds scalars only: lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def _is_list_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        return True
    return any(_is_list_type(a) for a in typing.get_args(annotation)) if origin is not None else False


def _list_fields() -> set[tuple[str, str]]:
    """``(section, key)`` of the config fields that hold lists."""
    out = set()
    for section, info in Config.model_fields.items():
        model = info.annotation
        for key, field_info in getattr(model, "model_fields", {}).items():
            if _is_list_type(field_info.annotation):
                out.add((section, key))
    return out


def _decode_lists(nested: dict[str, Any]) -> None:
    for section, key in _list_fields():
        value = nested.get(section, {}).get(key)
        if isinstance(value, str):
            try:
                nested[section][key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # left for the config's validation to refuse, naming the key


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} to the run config")


def app_pyproject(settings: AppSettings) -> str:
    """The text of the Flower app's ``pyproject.toml`` for ``settings``."""
    lines = [
        "# A Flower app that runs memfl (generated by `memfl flower app`).",
        "# memfl (and its pinned flwr/torch) must be installed on the SuperLink machine and on every",
        "# SuperNode: the components below live in the installed package, not in this folder.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "0.1.0"',
        'description = "memfl strategies and local trainers on Flower\'s deployment runtime"',
        'license = "MIT"',
        "dependencies = []  # nothing to install at run time: run with runtime dependency installation off",
        "",
        "[tool.flwr.app]",
        f'publisher = "{PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
        "# the Flower runtime's own settings",
    ]
    for key in RUNTIME_DEFAULTS:
        lines.append(f"{key} = {_toml_value(getattr(settings, key.replace('-', '_')))}")
    for section, table in settings.config.to_json(set_only=True).items():
        lines += ["", f"[tool.flwr.app.config.memfl.{section}]"]
        if section == "run":
            lines.append("# out: where the ServerApp writes results.json, on the SuperLink's machine")
        for key, value in table.items():
            if value is None:
                continue
            note = "  # a JSON list (Flower's run config holds no arrays)" if isinstance(value, (list, tuple)) else ""
            lines.append(f"{key} = {_toml_value(_encode(value))}{note}")
    return "\n".join(lines) + "\n"


def write_app(folder: str | Path, settings: AppSettings) -> Path:
    """Write the Flower app folder (a ``pyproject.toml``) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(settings))
    return folder
