import pytest

from medsight.config import (CamMethod, Config, ConfigError, LoggerName, OptimizerName, TaskKind, apply_overrides,
                             choices, config_from_dict, load_config, validate_config, with_values)


def test_defaults_validate(tmp_path):
    """The embedded defaults pass validation unchanged and without a warning, are the documented run (CoAtNet-tiny
    with SAM on the embedded PneumoniaMNIST), and come back the same from a saved config.yaml."""
    import warnings

    from medsight.config import config_to_dict, save_config

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = validate_config(Config())
    assert config_to_dict(cfg) == config_to_dict(Config())
    assert (cfg.model.name, cfg.optim.name, cfg.data.path, cfg.data.task) == ("coatnet_tiny", "sam-adamw", "", "auto")
    save_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


def test_set_overrides_parse_yaml_values():
    cfg = apply_overrides(Config(), ["optim.lr=0.01", "train.class_weights=true", "model.name=resnet18",
                                     "data.class_names=[a, b]", "optim.weight_decay=1e-4"])
    assert cfg.optim.lr == 0.01 and cfg.train.class_weights is True
    assert cfg.model.name == "resnet18" and cfg.data.class_names == ["a", "b"]
    assert cfg.optim.weight_decay == 1e-4  # PyYAML reads 1e-4 as a string; it is still a number


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.rhoo'.*'rho'"):
        apply_overrides(Config(), ["optim.rhoo=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        config_from_dict({"trian": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*'epochs'"):
        config_from_dict({"train": {"epoch": 3}})


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        apply_overrides(Config(), ["train.epochs=three"])
    with pytest.raises(ConfigError, match="train.class_weights: expected true or false"):
        config_from_dict({"train": {"class_weights": "yes please"}})
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        config_from_dict({"train": 3})


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("schedule.min_lr=nan", "schedule.min_lr must be a finite number"),
    ("optim.rho=0", "optim.rho must be > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("data.image_size=100000", "data.image_size must be <= 2048"),
    ("data.val_fraction=0.9", "val_fraction \\+ data.test_fraction must be < 1"),
    ("optim.name=sam-sgdd", "optim.name must be one of .*Did you mean 'sam-sgd'"),
    ("explain.method=gradkam", "explain.method must be one of .*Did you mean 'gradcam'"),
    ("model.layout=TTCC", "model.layout must be one of CCTT, CCCT"),
    ("data.task=multilable", "data.task must be one of"),
    ("train.loggers=[wandb]", "train.loggers must be one of tensorboard, mlflow"),
])
def test_out_of_range_options_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(Config(), [override]))


@pytest.mark.parametrize("raw", ["out=!!python/object/apply:os.system [ls]", "optim.lr=[1, 2", "out=!!binary aGk="])
def test_set_values_with_yaml_tags_or_broken_yaml_are_refused(raw):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides(Config(), [raw])


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  name: resnet18\noptim:\n  name: sgd\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("resnet18", "sgd", 0.1, 2)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_binary_or_non_mapping_config_files_are_named(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 10)
    with pytest.raises(ConfigError, match=f"{binary}.*not a text file"):
        load_config(binary)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_config_is_frozen_and_copies_are_validated():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # nothing downstream may change a validated config
    other = with_values(cfg, {"optim.lr": 0.5, "out": "runs/x"})
    assert (other.optim.lr, other.out, cfg.optim.lr) == (0.5, "runs/x", 2e-3)
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        with_values(cfg, {"optim.lr": -1.0})


def test_every_name_list_has_one_source():
    """The registries are built from (and checked against) config's Literal types."""
    from medsight.config import AutoAugment
    from medsight.data.transforms import AUTO_AUGMENT_POLICIES
    from medsight.engine.loggers import LOGGERS
    from medsight.evaluation.ensemble import METHODS
    from medsight.explainers import EXPLAINERS
    from medsight.optim import OPTIMIZERS
    from medsight.tasks import TASKS

    assert tuple(OPTIMIZERS) == choices(OptimizerName)
    assert tuple(EXPLAINERS) == choices(CamMethod)
    assert set(TASKS) | {"auto"} == set(choices(TaskKind))
    assert tuple(LOGGERS) == choices(LoggerName)
    assert ("none", *AUTO_AUGMENT_POLICIES) == choices(AutoAugment)
    assert METHODS == ("soft", "weighted", "stacking", "ovo")
