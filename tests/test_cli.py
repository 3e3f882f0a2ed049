"""The command line: real sub-commands through ``memfl.cli.main`` and the installed entry point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memfl.cli import main


def test_memory_json(capsys):
    assert main(["memory", "--model", "cnn", "--input", "1x28x28", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] > 0 and out["peak_bytes"] >= sum(
        out["breakdown"][k] for k in ("parameters", "gradients", "optimizer_state", "activations")
    )
    assert "measured_peak_bytes" not in out


def test_memory_measure_json(capsys):
    assert main(["memory", "--model", "cnn", "--input", "1x28x28", "--batch", "16", "--json", "--measure"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_peak_bytes"] > 0
    assert abs(out["peak_bytes"] - out["measured_peak_bytes"]) / out["measured_peak_bytes"] < 0.25


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["memory", "--model", "nope", "--input", "1x28x28"], "--model"),
        (["memory", "--model", "cnn", "--input", "28x28"], "CxHxW"),
        (["memory", "--model", "cnn", "--input", "1x28x28", "--plan", "stage"], "--plan"),
        (["run", "--clients", "0"], "run.clients"),
        (["run", "--partition", "dirichlet:x"], "partition"),
    ],
)
def test_bad_input_is_a_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_config_file_names_the_key(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nbatchsize = 3\n")
    assert main(["run", "--config", str(p)]) == 2
    assert "train.batchsize" in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err


def test_run_and_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "r"
    argv = [
        "run",
        "--dataset",
        "synthetic",
        "--clients",
        "4",
        "--per-round",
        "2",
        "--rounds",
        "2",
        "--partition",
        "iid",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["rounds"]) == 2 and (out / "accuracy.png").exists()
    (out / "accuracy.png").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "memfl" in table and "accuracy" in table  # the default method
    assert "mean over rounds" in table  # the comparison table (its caption; rich wraps the header at 80 columns)
    assert (out / "accuracy.png").stat().st_size > 1000  # report drew the plot again
    assert (out / "comparison.png").stat().st_size > 1000  # accuracy vs time + participation


# the entry point pip installed next to this interpreter (the venv's bin/), else one on PATH
MEMFL_BIN = shutil.which("memfl", path=str(Path(sys.executable).parent)) or shutil.which("memfl")


@pytest.mark.skipif(MEMFL_BIN is None, reason="the memfl entry point is not installed")
def test_installed_entry_point():
    r = subprocess.run([MEMFL_BIN, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "memory" in r.stdout and "run" in r.stdout


def test_memory_width_and_scalefl_head_flags(capsys):
    """`memfl memory --width` scales the model; `--exit-width model --projection authors` (the authors'
    heads) cost more than ScaleFL's light ones and travel in the plan."""

    def peak(*extra):
        assert main(["memory", "--model", "resnet18", "--input", "1x28x28", "--batch", "8", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    full, narrow = peak(), peak("--width", "0.125")
    assert narrow["peak_bytes"] < full["peak_bytes"] / 4
    light = peak("--width", "0.125", "--plan", "stage:1")
    authors = peak("--width", "0.125", "--plan", "stage:1", "--exit-width", "model", "--projection", "authors")
    assert light["peak_bytes"] < authors["peak_bytes"] < narrow["peak_bytes"]
    assert authors["plan"]["options"] == {"exit_width": "model", "projection": "authors"}
    assert main(["memory", "--model", "cnn", "--input", "1x28x28", "--width", "1.5"]) == 2
