"""Typed run configuration: dataclasses loaded from YAML, overridden by ``--set key=value``.

Every option a run uses lives here, so one resolved ``config.yaml`` beside each checkpoint says
exactly how the run was made. Everything is validated before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "ExplainConfig",
    "ChecklistConfig",
    "FinetuneConfig",
    "DEFAULT_DATA",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "validate_config",
    "save_config",
]

#: The embedded default data set (real PneumoniaMNIST chest X-rays; see data/README.md).
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "pneumoniamnist.npz"


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or out-of-range value."""


@dataclass
class DataConfig:
    path: str = ""  # empty: the embedded PneumoniaMNIST default
    class_names: list[str] | None = None  # display names in label order; default: from the data
    num_classes: int | None = None  # expected class count (checked against the data; sizes a synthetic dry run)
    image_size: int = 64
    val_fraction: float = 0.1  # used only when the data carries no split of its own
    test_fraction: float = 0.15
    train_fraction: float = 1.0  # keep this stratified fraction of the training labels (label-budget studies)
    pretext: str = "none"  # none | rotation: self-supervised pretraining, labels ignored (see medsight.data)
    split_seed: int = 0
    num_workers: int | None = None  # loader processes; None: 0 on CPU (they would take the cores), up to 8 on a GPU
    hflip: bool = True
    rotate_degrees: float = 0.0
    translate: float = 0.0  # fraction of the image size for random shifts
    rrc_scale: float = 1.0  # random resized crop: smallest area fraction kept; 1 = off
    brightness: float = 0.0  # colour jitter strengths; 0 = off
    contrast: float = 0.0
    clahe: bool = False  # contrast-limited adaptive histogram equalization (train and inference)
    clahe_clip: float = 2.0
    auto_augment: str = "none"  # none | randaugment | autoaugment | trivialaugment
    random_erasing: float = 0.0  # probability of erasing a random rectangle


@dataclass
class ModelConfig:
    name: str = "coatnet_tiny"
    pretrained: bool = False
    weights: str | None = None  # a local .pt/.pth/.safetensors file of backbone weights
    layout: str | None = None  # block layout of medsight's CoAtNets: "CCTT" or "CCCT"
    drop_path_rate: float = 0.0
    freeze_stages: int = 0  # freeze the stem and the first N stages (e.g. 2: train only CoAtNet's transformer stages)


@dataclass
class OptimConfig:
    name: str = "sam-adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    rho: float = 0.05
    adaptive: bool = False
    sam_bn: str = "first"  # BatchNorm running statistics from SAM's first pass only ("first") or "both"
    sam_sync_first_pass: bool = False  # many GPUs: all-reduce the ascent gradient (False: per-replica, as in the paper)
    looksam_k: int = 5  # looksam-*: SAM gradient recomputed every k steps
    looksam_alpha: float = 0.7  # looksam-*: weight of the reused orthogonal SAM direction
    looksam_layerwise: bool = True  # looksam-*: scale the reused direction per parameter tensor


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine (with linear warmup) | step | none
    warmup_epochs: int = 1
    step_size: int = 10
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    min_lr: float = 1e-6


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    label_smoothing: float = 0.0
    class_weights: bool = True  # class weights in the loss (see class_weight_mode)
    class_weight_mode: str = "inverse"  # inverse (N / K n_k) | effective (effective number of samples)
    class_weight_beta: float = 0.999  # beta of the effective-number weights
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None  # per-class alpha of the focal loss (multiplies the class weights)
    mixup: float = 0.0  # mixup alpha; 0 = off (soft targets, with the same loss)
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    grad_checkpointing: bool = False  # trade compute for memory where timm supports it
    monitor: str = "auc"  # validation metric that picks best.pt: auc | accuracy | balanced_accuracy | loss
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    accum_steps: int = 1  # gradient accumulation: micro-batches of batch_size per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    grad_scaler: bool | None = None  # fp16 loss scaling; None = on for fp16 (ignored, with a warning, for bf16)
    compile: bool = False  # torch.compile the model (GPU speed; CoAtNet compiles with fused attention off)
    sharpness_batches: int = 4  # batches of training images for the sharpness estimate in metrics.json; 0 = off
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class ExplainConfig:
    method: str = "gradcam"
    target_layer: str | None = None  # dotted module name; None picks the last stage
    gallery_per_class: int = 4  # correct and misclassified test images per class in the gallery
    faithfulness_images: int = 16  # test images for deletion/insertion curves in metrics.json; 0 = off
    faithfulness_methods: list[str] = field(default_factory=lambda: ["gradcam", "gradcam++", "hirescam",
                                                                     "layercam", "eigencam"])


@dataclass
class FinetuneConfig:
    """Progressive fine-tuning in three phases: the head alone, then every layer with discriminative
    learning rates (lr × lr_decay^(depth from the top) per layer group), then every layer at a low lr."""

    progressive: bool = False
    head_epochs: int = 1
    discriminative_epochs: int = 1  # the rest of train.epochs is phase 3
    lr_decay: float = 0.5
    final_lr_scale: float = 0.1


@dataclass
class ChecklistConfig:
    """Validation checklist: each threshold set here gets a PASS/FAIL line in metrics.json and the report."""

    min_accuracy: float | None = None
    min_auc: float | None = None
    min_recall: float | None = None  # every class's recall (sensitivity)
    max_ece: float | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    checklist: ChecklistConfig = field(default_factory=ChecklistConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    out: str = ""  # run folder; empty: runs/MODEL-TIMESTAMP


MONITORS = ("auc", "accuracy", "balanced_accuracy", "loss")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTO_AUGMENTS = ("none", "randaugment", "autoaugment", "trivialaugment")
PRETEXTS = ("none", "rotation")
SCHEDULES = ("cosine", "step", "multistep", "none")
LAYOUTS = ("CCTT", "CCCT")


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_suggest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data, rejecting unknown keys and wrong types."""
    return _build(Config, data or {}, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``key=value`` strings (dotted keys, YAML values) on top of ``cfg``."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                where = ".".join(parts[:i])
                choices = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(
                    f"unknown config section '{'.'.join(parts[: i + 1])}'"
                    f"{' in ' + where if where else ''}.{_suggest(part, choices)}"
                )
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise ConfigError(f"unknown config key '{key}'.{_suggest(leaf, node)}")
        node[leaf] = yaml.safe_load(raw) if raw.strip() != "" else None
    return config_from_dict(data)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        cfg = config_from_dict(data)
    return apply_overrides(cfg, overrides)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_config(cfg: Config) -> None:
    """Reject out-of-range values before any work starts."""
    from medsight.optim import OPTIMIZERS  # local: optim imports torch

    o, t, d, s = cfg.optim, cfg.train, cfg.data, cfg.schedule
    _check(o.name in OPTIMIZERS, f"optim.name: unknown optimizer {o.name!r}; choose from "
           f"{', '.join(OPTIMIZERS)}.{_suggest(o.name, OPTIMIZERS)}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    if "sam" in o.name:
        _check(o.rho > 0, f"optim.rho must be > 0 for SAM, got {o.rho}")
        if o.adaptive and not 0.01 <= o.rho <= 10:
            warnings.warn(f"optim.rho={o.rho} is outside the usual range for adaptive SAM (0.01-10; the ASAM "
                          f"paper uses 0.5-2)", stacklevel=2)
    _check(o.sam_bn in ("first", "both"), f"optim.sam_bn must be 'first' or 'both', got {o.sam_bn!r}")
    _check(o.looksam_k >= 1, f"optim.looksam_k must be >= 1, got {o.looksam_k}")
    _check(o.looksam_alpha >= 0, f"optim.looksam_alpha must be >= 0, got {o.looksam_alpha}")
    _check(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    _check(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.grad_scaler and t.precision != "fp16":
        warnings.warn(f"train.grad_scaler is only for fp16; ignored with precision {t.precision}", stacklevel=2)
    _check(t.loss in ("ce", "focal"), f"train.loss must be ce or focal, got {t.loss!r}")
    _check(t.focal_gamma >= 0, f"train.focal_gamma must be >= 0, got {t.focal_gamma}")
    _check(t.focal_alpha is None or all(a > 0 for a in t.focal_alpha), "train.focal_alpha values must be > 0")
    _check(t.class_weight_mode in ("inverse", "effective"),
           f"train.class_weight_mode must be inverse or effective, got {t.class_weight_mode!r}")
    _check(0 < t.class_weight_beta < 1, f"train.class_weight_beta must be in (0, 1), got {t.class_weight_beta}")
    _check(t.mixup >= 0 and t.cutmix >= 0, "train.mixup and train.cutmix must be >= 0")
    _check(d.num_classes is None or d.num_classes >= 2, f"data.num_classes must be >= 2, got {d.num_classes}")
    _check(d.num_classes is None or not d.class_names or d.num_classes == len(d.class_names),
           "data.num_classes and data.class_names disagree")
    _check(0 < d.rrc_scale <= 1, f"data.rrc_scale must be in (0, 1], got {d.rrc_scale}")
    _check(d.brightness >= 0 and d.contrast >= 0, "data.brightness and data.contrast must be >= 0")
    _check(d.clahe_clip > 0, f"data.clahe_clip must be > 0, got {d.clahe_clip}")
    _check(d.auto_augment in AUTO_AUGMENTS, f"data.auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, "
           f"got {d.auto_augment!r}")
    _check(0 <= d.random_erasing <= 1, f"data.random_erasing must be in [0, 1], got {d.random_erasing}")
    _check(cfg.model.freeze_stages >= 0, f"model.freeze_stages must be >= 0, got {cfg.model.freeze_stages}")
    _check(t.sharpness_batches >= 0, f"train.sharpness_batches must be >= 0, got {t.sharpness_batches}")
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _check(t.monitor in MONITORS, f"train.monitor must be one of {', '.join(MONITORS)}, got {t.monitor!r}")
    _check(t.patience >= 0, f"train.patience must be >= 0, got {t.patience}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    _check(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    _check(d.image_size >= 16, f"data.image_size must be >= 16, got {d.image_size}")
    _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _check(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction must be < 1")
    _check(0 < d.train_fraction <= 1, f"data.train_fraction must be in (0, 1], got {d.train_fraction}")
    _check(d.pretext in PRETEXTS, f"data.pretext must be one of {', '.join(PRETEXTS)}, got {d.pretext!r}"
           + _suggest(d.pretext, PRETEXTS))
    if d.pretext == "rotation":
        clashing = [name for name, on in (("data.hflip", d.hflip), ("data.rotate_degrees > 45", d.rotate_degrees > 45),
                                          (f"data.auto_augment={d.auto_augment}", d.auto_augment != "none")) if on]
        if clashing:
            warnings.warn(f"{', '.join(clashing)} with the rotation pretext blur its labels (a flipped 90° turn "
                          f"looks like a 270° turn); turn them off for pretraining", stacklevel=2)
    _check(d.num_workers is None or d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(0 <= d.rotate_degrees <= 180, f"data.rotate_degrees must be in [0, 180], got {d.rotate_degrees}")
    _check(0 <= d.translate < 0.5, f"data.translate must be in [0, 0.5), got {d.translate}")
    _check(s.name in SCHEDULES, f"schedule.name must be one of {', '.join(SCHEDULES)}, got {s.name!r}")
    _check(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    _check(s.name != "multistep" or (s.milestones and all(m >= 1 for m in s.milestones)),
           "schedule.milestones must list epochs >= 1 for the multistep schedule")
    _check(s.step_size >= 1, f"schedule.step_size must be >= 1, got {s.step_size}")
    _check(0 < s.gamma <= 1, f"schedule.gamma must be in (0, 1], got {s.gamma}")
    m = cfg.model
    _check(m.layout is None or m.layout.upper() in LAYOUTS,
           f"model.layout must be one of {', '.join(LAYOUTS)}, got {m.layout!r}")
    _check(0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    f = cfg.finetune
    if f.progressive:
        _check(f.head_epochs >= 1 and f.discriminative_epochs >= 1,
               "finetune.head_epochs and finetune.discriminative_epochs must be >= 1")
        _check(f.head_epochs + f.discriminative_epochs <= t.epochs,
               f"finetune: {f.head_epochs} head + {f.discriminative_epochs} discriminative epochs exceed "
               f"train.epochs={t.epochs}")
        _check(0 < f.lr_decay <= 1, f"finetune.lr_decay must be in (0, 1], got {f.lr_decay}")
        _check(0 < f.final_lr_scale <= 1, f"finetune.final_lr_scale must be in (0, 1], got {f.final_lr_scale}")
        _check(cfg.model.freeze_stages == 0, "finetune.progressive decides what trains; leave model.freeze_stages at 0")
    for key, value in dataclasses.asdict(cfg.checklist).items():
        _check(value is None or 0 <= value <= 1, f"checklist.{key} must be in [0, 1], got {value}")
    _check(cfg.explain.gallery_per_class >= 0, "explain.gallery_per_class must be >= 0")
    from medsight.explain import EXPLAINERS

    _check(cfg.explain.faithfulness_images >= 0, "explain.faithfulness_images must be >= 0")
    for m in cfg.explain.faithfulness_methods:
        _check(m in EXPLAINERS, f"explain.faithfulness_methods: unknown method {m!r}; choose from "
               f"{', '.join(EXPLAINERS)}.{_suggest(m, EXPLAINERS)}")
    _check(cfg.explain.method in EXPLAINERS, f"explain.method: unknown method {cfg.explain.method!r}; "
           f"choose from {', '.join(EXPLAINERS)}.{_suggest(cfg.explain.method, EXPLAINERS)}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
