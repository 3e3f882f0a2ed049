import pytest

from memfl.config import ConfigError, build_config, load_config, with_overrides


def test_defaults_are_valid():
    cfg = build_config()
    assert cfg.run.method == "memfl" and cfg.train.batch_size == 32


def test_unknown_key_names_key_and_choices(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[run]\nclientz = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "run.clientz" in msg and "unknown key" in msg and "clients" in msg


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[run]\nclients = "ten"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "run.clients" in str(e.value) and "integer" in str(e.value)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[runn]\nclients = 3\n")
    with pytest.raises(ConfigError, match="runn"):
        load_config(p)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("run.partition", "dirichlet", "partition"),
        ("run.budgets", "relative:2-1", "budgets"),
        ("run.method", "nope", "method"),
        ("run.model", "resnet99", "model"),
        ("train.lr", -1.0, "train.lr"),
    ],
)
def test_bad_values_are_refused(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        with_overrides(build_config(), {key: value})


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_overrides_apply():
    cfg = with_overrides(build_config(), {"run.clients": 7, "train.lr": 0.1, "run.seed": None})
    assert cfg.run.clients == 7 and cfg.train.lr == 0.1 and cfg.run.seed == 0


def test_import_path_model_and_dataset(tmp_path, monkeypatch):
    import sys

    import pytest

    from memfl.config import ConfigError, build_config
    from memfl.core.protocol import Plan
    from memfl.server.setup import load_data, model_builder

    (tmp_path / "usermod_cfg.py").write_text(
        "import torch\n"
        "def make(width=1.0):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, max(1, int(8 * width))), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(max(1, int(8 * width)), 2))\n"
        "def fixed():\n    return make()\n"
        "def data():\n"
        "    x = torch.randn(20, 6); y = torch.arange(20) % 2\n"
        "    return (x[:16], y[:16]), (x[16:], y[16:])\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config({"run": {"model": "usermod_cfg:make", "dataset": "usermod_cfg:data", "method": "heterofl"}})
    data = load_data(cfg)
    assert data.input_shape == (6,) and data.num_classes == 2
    build = model_builder(cfg, data.input_shape, data.num_classes)
    assert build(Plan(kind="width", width=0.5))[0].out_features == 4
    with pytest.raises(ConfigError, match="run.model.*cannot import"):
        build_config({"run": {"model": "no_such_module_xyz:make"}})
    with pytest.raises(ConfigError, match="not a callable"):
        build_config({"run": {"dataset": "usermod_cfg:NOT_CALLABLE"}})
    with pytest.raises(ConfigError, match="width"):
        build_config({"run": {"model": "usermod_cfg:fixed", "method": "heterofl"}})
    sys.modules.pop("usermod_cfg", None)
