import pytest

from memfl.config import ConfigError, build_config, load_config, with_overrides


def test_defaults_are_valid():
    cfg = build_config()
    assert cfg.run.method == "fedavg" and cfg.train.batch_size == 32


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


@pytest.mark.parametrize("key,value,needle", [
    ("run.partition", "dirichlet", "partition"),
    ("run.budgets", "relative:2-1", "budgets"),
    ("run.method", "nope", "method"),
    ("run.model", "resnet99", "model"),
    ("train.lr", -1.0, "train.lr"),
])
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
