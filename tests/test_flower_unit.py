"""Fast tests of the Flower runtime without Flower processes: records, app config, the ClientApp."""

from __future__ import annotations

import tomllib

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402

from memfl.core.protocol import HyperParams, Instruction, Plan, Result  # noqa: E402
from memfl.runtime.flower import serde  # noqa: E402
from memfl.runtime.flower.appconfig import AppSettings, app_pyproject  # noqa: E402

MB = 1 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The ClientApp keeps a node's data share in the user cache: use a private one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def task_identity():
    """Building a Message outside a run needs Flower's task identity (as flwr.simulation sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 5),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_instruction_round_trip_is_exact():
    ins = Instruction(
        round=3,
        client_id=5,
        params=_tensors(),
        trainable=["conv.weight", "fc.bias"],
        plan=Plan(kind="stage", stage=2, options={"mentor": True}),
        hparams=HyperParams(lr=0.05, max_steps=4, prox_mu=0.01),
        seed=123,
        predicted_peak_bytes=10 * MB,
        budget_bytes=512 * MB,
    )
    content = serde.instruction_to_content(ins)
    assert set(content) == {serde.PARAMS, serde.META}
    back = serde.content_to_instruction(content)
    _same(ins.params, back.params)
    assert back.meta_json() == ins.meta_json()


def test_result_round_trip_keeps_extra_and_flat_metrics():
    res = Result(
        client_id=2,
        params=_tensors(),
        num_samples=40,
        loss=1.25,
        sample_losses=[0.5, 2.0],
        compute_seconds=0.3,
        steps=4,
        predicted_peak_bytes=99,
        metrics={"loss_sq_mean": 1.5},
    )
    content = serde.result_to_content(res, {"budget_bytes": 512 * MB, "device": "rpi4-4gb"})
    assert content[serde.METRICS]["num-examples"] == 40
    back, extra = serde.content_to_result(content)
    _same(res.params, back.params)
    assert back.meta_json() == res.meta_json()
    assert extra == {"budget_bytes": 512 * MB, "device": "rpi4-4gb"}


def test_records_are_fresh_per_message_and_hold_no_pickle():
    ins = Instruction(round=1, client_id=0, params=_tensors(), trainable=["conv.weight"])
    a, b = serde.instruction_to_content(ins), serde.instruction_to_content(ins)
    assert a is not b and a[serde.PARAMS] is not b[serde.PARAMS]
    for arr in a[serde.PARAMS].values():
        assert arr.stype == "numpy.ndarray" and arr.data[:6] == b"\x93NUMPY"  # .npy bytes


def test_app_settings_round_trip_through_the_pyproject(small_config):
    config = small_config(method="exclusive")
    settings = AppSettings(config=config, min_nodes=3, round_timeout=42.0)
    text = app_pyproject(settings)
    doc = tomllib.loads(text)
    app = doc["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "memfl.runtime.flower.server_app:app",
        "clientapp": "memfl.runtime.flower.client_app:app",
    }
    from flwr.common.config import flatten_dict

    flat = flatten_dict(app["config"])  # what Flower hands the apps
    assert flat == settings.to_run_config()
    back = AppSettings.from_run_config(flat)
    assert back == settings
    from memfl.config import ConfigError

    with pytest.raises(ConfigError, match="run.nonsense"):
        AppSettings.from_run_config({**flat, "memfl.run.nonsense": 1})


def _context(config, node_config, **settings):
    import random

    return Context(
        run_id=random.getrandbits(62),
        node_id=11,
        node_config=node_config,
        state=RecordDict(),
        run_config=AppSettings(config=config, **settings).to_run_config(),
    )


def test_node_spec_budget_sources(small_config):
    from memfl.data import DEVICES
    from memfl.runtime.flower.client_app import node_spec

    config = small_config()
    s = node_spec({"partition-id": 1, "memory-mb": 512.5, "device": "pixel-6"}, config)
    assert (s.budget_bytes, s.budget_source, s.speed, s.num_partitions) == (int(512.5 * MB), "declared", 1.0, 6)
    s = node_spec({"partition-id": 0, "device": "rpi4-4gb"}, config)
    assert s.budget_source == "profile" and s.budget_bytes == DEVICES["rpi4-4gb"].usable_bytes
    assert s.speed == DEVICES["rpi4-4gb"].speed
    s = node_spec({"partition-id": 0}, config)
    assert s.budget_source in ("measured", "profile") and s.budget_bytes > 0
    with pytest.raises(ValueError, match="partition-id"):
        node_spec({"memory-mb": 5}, config)
    with pytest.raises(ValueError, match="outside"):
        node_spec({"partition-id": 6}, config)


def test_client_app_in_process_matches_the_simulators_client(small_config, tmp_path):
    """The ClientApp, called in-process, trains client i exactly as the simulator's trainer does."""
    from memfl.core.trainer import LocalTrainer
    from memfl.methods import STRATEGIES
    from memfl.runtime.flower.client_app import app
    from memfl.server.setup import build_federation, load_data, make_context, model_builder

    config = small_config()
    data = load_data(config)
    model_fn = model_builder(config, data.input_shape, data.num_classes)
    ctx = make_context(config, data.input_shape, data.num_classes, model_fn)
    clients = build_federation(config, data, ctx.peak_fn(Plan()))
    torch.manual_seed(0)
    params = {k: v.clone() for k, v in model_fn(Plan()).state_dict().items()}
    target = clients[4]
    ins = STRATEGIES["fedavg"](ctx).instruction(1, target.info, Plan(), params)

    node = {"partition-id": 4, "num-partitions": 6, "memory-mb": 300.0, "device": "rpi4-4gb"}
    context = _context(config, node)
    query = app(Message(RecordDict(), dst_node_id=11, message_type=MessageType.QUERY), context)
    info = serde.content_to_info(query.content)
    assert info["partition_id"] == 4 and info["num_samples"] == target.info.num_samples
    assert info["budget_bytes"] == 300 * MB and info["input_shape"] == list(data.input_shape)

    msg = Message(serde.instruction_to_content(ins), dst_node_id=11, message_type=MessageType.TRAIN, group_id="1")
    reply = app(msg, context)
    assert not reply.has_error()
    got, extra = serde.content_to_result(reply.content)
    want = LocalTrainer(model_fn).fit(ins, target.x, target.y)
    assert got.num_samples == want.num_samples and got.steps == want.steps
    for k in want.params:
        torch.testing.assert_close(got.params[k], want.params[k], rtol=1e-5, atol=1e-6)
    assert extra["instruction_budget_bytes"] == ins.budget_bytes
    assert extra["budget_bytes"] == 300 * MB and extra["fit_seconds"] > 0
    # the query left the node's share in a file for the rest of the run; train read it from there
    shares = list((tmp_path / "cache" / "memfl" / "flower").glob("run-*/share-4-of-6-*.safetensors"))
    assert len(shares) == 1


def test_client_app_enforcing_its_budget_refuses_a_plan_too_big(small_config):
    from memfl.runtime.flower.client_app import app

    config = small_config()
    ins = Instruction(round=1, client_id=0, params={}, trainable=[], predicted_peak_bytes=50 * MB)
    context = _context(config, {"partition-id": 0, "memory-mb": 1.0, "enforce-budget": True})
    msg = Message(serde.instruction_to_content(ins), dst_node_id=11, message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(MemoryError, match="budget"):
        app(msg, context)


def test_memfl_flower_app_writes_an_app_flower_accepts(tmp_path, capsys):
    """`memfl flower app` writes a pyproject.toml that Flower's own validator (as `flwr run` uses it) accepts."""
    from flwr.common.config import validate_config

    from memfl.cli import main

    app_dir = tmp_path / "app"
    assert (
        main(
            [
                "flower",
                "app",
                "--app-dir",
                str(app_dir),
                "--method",
                "exclusive",
                "--rounds",
                "7",
                "--clients",
                "4",
                "--out",
                str(tmp_path / "res"),
            ]
        )
        == 0
    )
    doc = tomllib.loads((app_dir / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(doc, check_module=True, project_dir=app_dir)
    assert ok, errors
    from flwr.common.config import flatten_dict

    settings = AppSettings.from_run_config(flatten_dict(doc["tool"]["flwr"]["app"]["config"]))
    assert (settings.config.run.method, settings.config.run.rounds, settings.min_nodes) == ("exclusive", 7, 4)
    assert main(["flower", "app", "--print", "--rounds", "2"]) == 0
    assert "[tool.flwr.app.components]" in capsys.readouterr().out


def test_memfl_flower_local_refuses_clients_other_than_nodes(capsys):
    from memfl.cli import main

    assert main(["flower", "local", "--nodes", "3", "--clients", "10"]) == 2
    assert "every SuperNode is one client" in capsys.readouterr().err


@pytest.mark.parametrize("insecure", [True, False])
def test_warm_superexec_runs_the_command_line_flowers_executor_would(monkeypatch, insecure):
    """The warm SuperExec calls Flower's own flwr-clientapp / flwr-serverapp entry points with the
    arguments Flower's SubprocessExecutor would start them with (guards against flwr drifting)."""
    import subprocess

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from memfl.runtime.flower.superexec import fork_executor_class

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: started.append(list(args)))
    executor = fork_executor_class()
    for task_type in (TaskType.CLIENT_APP, TaskType.SERVER_APP):
        spec = ExecutionSpec(
            task_type=task_type,
            runtime_api_address="127.0.0.1:9094",
            token="t0k3n",
            insecure=insecure,
            root_certificates_path=None if insecure else "/ca.crt",
            runtime_dependency_install=False,
            parent_pid=4242,
            suppress_output=False,
            task_id=7,
        )
        SubprocessExecutor().launch(spec)
        assert executor.argv(spec) == started[-1]
        assert task_type in executor().entries  # forked, not started as a new process
