import pytest

from medsight.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, validate_config


def test_defaults_validate():
    validate_config(Config())


def test_set_overrides_parse_yaml_values():
    cfg = apply_overrides(Config(), ["optim.lr=0.01", "train.class_weights=true", "model.name=resnet18",
                                     "data.class_names=[a, b]"])
    assert cfg.optim.lr == 0.01 and cfg.train.class_weights is True
    assert cfg.model.name == "resnet18" and cfg.data.class_names == ["a", "b"]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.rhoo'.*'rho'"):
        apply_overrides(Config(), ["optim.rhoo=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        config_from_dict({"trian": {"epochs": 3}})


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        apply_overrides(Config(), ["train.epochs=three"])
    with pytest.raises(ConfigError, match="train.class_weights: expected true or false"):
        config_from_dict({"train": {"class_weights": "yes please"}})


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.rho=0", "optim.rho must be > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("optim.name=sam-sgdd", "unknown optimizer 'sam-sgdd'.*'sam-sgd'"),
    ("explain.method=gradkam", "unknown method 'gradkam'"),
    ("model.layout=TTCC", "model.layout must be one of"),
])
def test_out_of_range_options_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(Config(), [override]))


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  name: resnet18\noptim:\n  name: sgd\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("resnet18", "sgd", 0.1, 2)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
