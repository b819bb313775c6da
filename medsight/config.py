"""Typed run configuration: pydantic models loaded from YAML, overridden by ``--set key=value``.

Every option a run uses lives here, so one resolved ``config.yaml`` beside each checkpoint says exactly
how the run was made. pydantic does the parsing (strict types, ranges, finite numbers, no unknown keys);
medsight turns its errors into one line that names the key and, for a misspelling, suggests the right
name. A validated config is frozen: nothing downstream changes it (use :func:`with_values` for a copy).

The names of every choice (optimizers, CAM methods, task kinds, schedules, ...) are the ``Literal`` types
below: the CLI's choices, the registries in ``medsight.optim``, ``medsight.explainers`` and
``medsight.tasks``, and the tests all read them from here.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import types
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from medsight.errors import MedsightError
from medsight.utils.files import write_text_atomic

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
    "ExplainConfig", "ChecklistConfig", "FinetuneConfig", "DEFAULT_DATA", "load_config", "apply_overrides",
    "config_to_dict", "config_from_dict", "validate_config", "check_task_kind", "save_config", "with_values", "choices", "explicit_keys",
    "OptimizerName", "CamMethod", "TaskKind", "ScheduleName", "Monitor", "Precision", "LossName", "LoggerName",
    "AutoAugment", "Pretext", "Layout", "MAX_IMAGE_SIZE", "OrdinalHead", "ResizePolicy", "Preset", "LabelPolicy",
    "ThresholdRule", "EvalConfig", "ConformalScore", "CorruptionName", "MAX_CONFIG_BYTES", "read_yaml", "HeadName",
]

#: The embedded default data set (real PneumoniaMNIST chest X-rays; see data/README.md).
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "pneumoniamnist.npz"

#: Largest config file read: a run's config.yaml is a few kB; anything past this is refused before parsing.
MAX_CONFIG_BYTES = 256 * 1024

#: Largest input side accepted: beyond this one image alone would need gigabytes of activations.
MAX_IMAGE_SIZE = 2048

OptimizerName = Literal["sgd", "adam", "adamw", "sam-sgd", "sam-adam", "sam-adamw",
                        "looksam-sgd", "looksam-adam", "looksam-adamw"]
CamMethod = Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam"]
TaskKind = Literal["auto", "single_label", "ordinal", "multilabel"]
ScheduleName = Literal["cosine", "step", "multistep", "none"]
Monitor = Literal["auc", "accuracy", "balanced_accuracy", "loss", "qwk", "map"]
Precision = Literal["fp32", "bf16", "fp16"]
#: ce and focal for one label per image; multi-label (data.task=multilabel): bce (with per-finding positive
#: weights when train.class_weights), focal (its binary form) and asl (asymmetric loss, Ridnik et al. ICCV 2021).
LossName = Literal["ce", "focal", "bce", "asl"]
ClassWeightMode = Literal["inverse", "effective"]
LoggerName = Literal["tensorboard", "mlflow"]
AutoAugment = Literal["none", "randaugment", "autoaugment", "trivialaugment"]
Pretext = Literal["none", "rotation"]
Layout = Literal["CCTT", "CCCT"]
SamBn = Literal["first", "both"]
#: How an ordinal task learns its grades (medsight.tasks.ordinal): plain cross-entropy, distance-aware label
#: smoothing, CORN's conditional binary outputs (Shi et al. 2023), regression with cut-points tuned on validation.
OrdinalHead = Literal["ce", "smooth", "corn", "regression"]
#: Multi-label: what an uncertain (-1) or blank label becomes: left out of loss and metrics (ignore), positive
#: (ones, CheXpert's U-Ones) or negative (zeros, U-Zeros) — Irvin et al., CheXpert, AAAI 2019.
LabelPolicy = Literal["ignore", "ones", "zeros"]
#: Multi-label: how each finding's threshold is chosen on validation data.
ThresholdRule = Literal["youden", "sensitivity"]
#: Fitting an image to the square input: stretch it (squash), letterbox it (pad) or cut its centre (crop).
ResizePolicy = Literal["squash", "pad", "crop"]
#: Split-conformal non-conformity scores (medsight.metrics.conformal).
ConformalScore = Literal["lac", "aps"]

#: Image corruptions of the robustness check (medsight.evaluation.robustness), in report order.
CorruptionName = Literal["gaussian_noise", "blur", "contrast", "brightness", "jpeg", "resolution"]

#: The classifier head (medsight.models.heads): a linear layer; a Dirichlet (evidential) output whose uncertainty
#: u = K/S feeds abstention (Sensoy et al. 2018); a cosine classifier (normalized features and weights times a
#: scale); class prototypes, trained episodically, compared by distance (Snell et al. 2017).
HeadName = Literal["linear", "evidential", "cosine", "prototypical"]

#: Preprocessing for a kind of image: fundus photographs are cropped to their circular field of view.
Preset = Literal["none", "fundus"]


def choices(literal: Any) -> tuple[str, ...]:
    """The names of a ``Literal`` type, in order (what the CLI offers and the registries must cover)."""
    return tuple(get_args(literal))


class ConfigError(MedsightError, ValueError):
    """A configuration that cannot run: unknown key, wrong type or out-of-range value."""


# ------------------------------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2 scalars and without anchors or aliases.

    Written here because PyYAML implements YAML 1.1 only, where ``010`` is octal (8), ``1:30`` is base 60
    (90) and ``yes``/``on`` are booleans, and expands every alias (a "billion laughs" file of a few
    hundred bytes builds gigabytes); ruamel.yaml is not a dependency. Scalars follow YAML 1.2's core
    schema, with numbers in decimal only (``0x1`` and ``0o7`` stay text): ``null``/``~``/empty, ``true``/
    ``false``, decimal integers and floats (``1e-3`` included), ``.inf``/``.nan``; everything else is a
    string. An anchor (``&a``) or alias (``*a``) is refused where it appears.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not accepted "
                                              "in a medsight config; write the value out", event.start_mark)
        return super().compose_node(parent, index)


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if len(text) > 40:  # no option takes a number this long; int() of a huge text is slow
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} digits", node.start_mark)
    return int(text, 10)


_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
        ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
        ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
        ("int", r"[-+]?[0-9]+", list("-+0123456789")),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
         list("-+.0123456789"))):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), _first)
_Loader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def _yaml_error(exc: BaseException) -> str:
    """PyYAML's message on one line, bounded (it quotes the offending line)."""
    text = " ".join(str(exc).split()) if isinstance(exc, yaml.YAMLError) else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def read_yaml(text: str) -> Any:
    """Parse ``text`` by medsight's YAML rules (:class:`_Loader`); a ``yaml.YAMLError`` on anything else."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except (ValueError, RecursionError) as exc:  # a number Python refuses, or nesting deeper than the stack
        raise yaml.YAMLError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def _clip(value: Any) -> str:
    """A bounded repr for error messages: a value from a file or the command line can be any size."""
    return _REPR.repr(value)


def _number(v: Any) -> Any:
    if isinstance(v, str):  # PyYAML reads "1e-3" (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _text(v: Any) -> Any:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _duration(v: Any) -> Any:
    """``"5m"``, ``"90s"``, ``"1.5h"`` or a number of seconds -> seconds."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", v)
        if m:
            return float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m.group(2)]
    return v


def _upper(v: Any) -> Any:
    return v.upper() if isinstance(v, str) else v


Float = Annotated[float, BeforeValidator(_number)]
Text = Annotated[str, BeforeValidator(_text)]
Fraction = Annotated[Float, Field(gt=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False,
                              protected_namespaces=())


class DataConfig(_Section):
    path: Text = ""  # empty: the embedded PneumoniaMNIST default
    path_column: Text | None = None  # CSV manifests: the image path column (None: found automatically)
    label_column: Text | None = None  # CSV manifests: the label column (None: found automatically)
    allow_outside_paths: bool = False  # CSV manifests: allow image paths outside the manifest's folder
    cache: Text | None = None  # a prepared cache folder of this source (medsight prepare; made when new)
    task: TaskKind = "auto"  # auto: read from the data (single_label for one class per image)
    class_names: list[Text] | None = None  # display names in label order; default: from the data
    num_classes: Annotated[int, Field(ge=2)] | None = None  # expected class count (sizes a synthetic dry run)
    image_size: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE)] = 64
    val_fraction: Fraction = 0.1  # used only when the data carries no split of its own
    test_fraction: Fraction = 0.15
    train_fraction: Annotated[Float, Field(gt=0, le=1)] = 1.0  # stratified share of the training labels kept
    shots: Annotated[int, Field(ge=1)] | None = None  # few-shot: keep k labelled training images per class (--shots)
    pretext: Pretext = "none"  # rotation: self-supervised pretraining, labels ignored (see medsight.data)
    split_seed: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] | None = None  # None: 0 on CPU, up to 8 on a GPU
    hflip: bool = True
    rotate_degrees: Annotated[Float, Field(ge=0, le=180)] = 0.0
    translate: Annotated[Float, Field(ge=0, lt=0.5)] = 0.0  # fraction of the image size for random shifts
    rrc_scale: Annotated[Float, Field(gt=0, le=1)] = 1.0  # random resized crop: smallest area kept; 1 = off
    brightness: Annotated[Float, Field(ge=0)] = 0.0  # colour jitter strengths; 0 = off
    contrast: Annotated[Float, Field(ge=0)] = 0.0
    clahe: bool = False  # contrast-limited adaptive histogram equalization (train and inference)
    clahe_clip: Annotated[Float, Field(gt=0)] = 2.0
    auto_augment: AutoAugment = "none"
    random_erasing: Annotated[Float, Field(ge=0, le=1)] = 0.0  # probability of erasing a random rectangle
    resize: ResizePolicy = "squash"  # squash | pad (letterbox, aspect kept) | crop (centre crop, aspect kept)
    preset: Preset = "none"  # fundus: crop to the circular field of view and mask the outside
    graham: bool = False  # fundus: Graham's local-average colour normalization (Kaggle DR 2015)
    grade_order: list[Text] | None = None  # ordinal: the data's class names, lowest grade first
    refer_grade: Annotated[int, Field(ge=1)] = 2  # ordinal: grades >= this are referable, in the labels' units
    refer_sensitivity: Fraction = 0.9  # ordinal: the referral threshold is chosen on val for this sensitivity
    label_columns: list[Text] | None = None  # multi-label CSV, one column per finding: those columns (None: found)
    uncertain: LabelPolicy = "ignore"  # multi-label: uncertain labels (-1) -> ignore (masked) | ones | zeros
    uncertain_per_finding: dict[str, LabelPolicy] | None = None  # multi-label: a policy per finding, over `uncertain`
    blank: LabelPolicy = "ignore"  # multi-label CSV: a blank cell (finding not mentioned) -> ignore | ones | zeros

    @model_validator(mode="after")
    def _check_preprocessing(self) -> DataConfig:
        if self.graham and self.preset != "fundus":
            raise ValueError("data.graham normalizes fundus photographs inside their field of view; it needs "
                             "data.preset=fundus")
        if self.grade_order is not None and len(set(self.grade_order)) != len(self.grade_order):
            raise ValueError(f"data.grade_order names a class twice: {', '.join(self.grade_order)}")
        return self

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        if self.num_classes is not None and self.class_names and self.num_classes != len(self.class_names):
            raise ValueError("data.num_classes and data.class_names disagree")
        return self


class ModelConfig(_Section):
    name: Text = "coatnet_tiny"
    pretrained: bool = False
    weights: Text | None = None  # a local .pt/.pth/.safetensors file of backbone weights
    layout: Annotated[Layout, BeforeValidator(_upper)] | None = None  # medsight's CoAtNets: CCTT or CCCT
    drop_path_rate: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    freeze_stages: Annotated[int, Field(ge=0)] = 0  # freeze the stem and the first N stages


class OptimConfig(_Section):
    name: OptimizerName = "sam-adamw"
    lr: Annotated[Float, Field(gt=0, le=10)] = 2e-3
    weight_decay: Annotated[Float, Field(ge=0)] = 0.05
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    rho: Annotated[Float, Field(gt=0, le=100)] = 0.05
    adaptive: bool = False
    sam_bn: SamBn = "first"  # BatchNorm running statistics from SAM's first pass only, or "both"
    sam_sync_first_pass: bool = False  # many GPUs: all-reduce the ascent gradient (False: per replica, as in the paper)
    looksam_k: Annotated[int, Field(ge=1)] = 5  # looksam-*: SAM gradient recomputed every k steps
    looksam_alpha: Annotated[Float, Field(ge=0)] = 0.7  # looksam-*: weight of the reused SAM direction
    looksam_layerwise: bool = True  # looksam-*: scale the reused direction per parameter tensor


class ScheduleConfig(_Section):
    name: ScheduleName = "cosine"  # cosine (with linear warmup) | step | multistep | none
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    step_size: Annotated[int, Field(ge=1)] = 10
    milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)  # multistep: epochs of ×gamma
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1
    min_lr: Annotated[Float, Field(ge=0)] = 1e-6

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.name == "multistep" and not self.milestones:
            raise ValueError("schedule.milestones must list epochs >= 1 for the multistep schedule")
        return self


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 4
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    label_smoothing: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    class_weights: bool = True  # class weights in the loss (see class_weight_mode)
    class_weight_mode: ClassWeightMode = "inverse"  # inverse (N / K n_k) | effective (effective number)
    class_weight_beta: Fraction = 0.999
    loss: LossName = "ce"
    ordinal: OrdinalHead = "ce"  # data.task=ordinal: ce | smooth | corn | regression (see medsight.tasks.ordinal)
    ordinal_smoothing: Annotated[Float, Field(gt=0, lt=1)] = 0.2  # ordinal=smooth: target mass on other grades
    focal_gamma: Annotated[Float, Field(ge=0)] = 2.0
    asl_gamma_neg: Annotated[Float, Field(ge=0)] = 4.0  # loss=asl: focusing on negatives (Ridnik et al. 2021)
    asl_gamma_pos: Annotated[Float, Field(ge=0)] = 0.0  # loss=asl: focusing on positives
    asl_clip: Annotated[Float, Field(ge=0, lt=1)] = 0.05  # loss=asl: probability margin shifted off easy negatives
    threshold_rule: ThresholdRule = "youden"  # multi-label: per-finding thresholds on val (Youden's J or sensitivity)
    target_sensitivity: Fraction = 0.9  # multi-label, threshold_rule=sensitivity: the sensitivity aimed at on val
    focal_alpha: list[Annotated[Float, Field(gt=0)]] | None = None  # per-class alpha (multiplies the weights)
    mixup: Annotated[Float, Field(ge=0)] = 0.0  # mixup alpha; 0 = off
    cutmix: Annotated[Float, Field(ge=0)] = 0.0  # cutmix alpha; 0 = off
    grad_checkpointing: bool = False  # trade compute for memory where timm supports it
    monitor: Monitor = "auc"  # validation metric that picks best.pt
    patience: Annotated[int, Field(ge=0)] = 0  # early stopping after this many epochs without improvement
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    device: Text = "auto"  # auto | cpu | cuda | cuda:N
    grad_clip: Annotated[Float, Field(ge=0)] = 0.0  # max gradient norm; 0 = off
    accum_steps: Annotated[int, Field(ge=1)] = 1  # micro-batches of batch_size per optimizer step
    precision: Precision = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    grad_scaler: bool | None = None  # fp16 loss scaling; None = on for fp16
    compile: bool = False  # torch.compile the model (CoAtNet compiles with fused attention off)
    sharpness_batches: Annotated[int, Field(ge=0)] = 4  # training batches for the sharpness estimate; 0 = off
    threads: Annotated[int, Field(ge=0)] = 0  # torch CPU threads; 0 = torch's default
    loggers: list[LoggerName] = Field(default_factory=list)  # tensorboard, mlflow: written into the run folder
    time_budget: Annotated[Float, BeforeValidator(_duration), Field(gt=0)] | None = None  # seconds ("5m", "90s")
    head: HeadName = "linear"  # linear | evidential | cosine | prototypical (see medsight.models.heads)
    cosine_scale: Annotated[Float, Field(gt=0, le=1000)] = 16.0  # head=cosine: logits = scale × cosine
    cosine_learn_scale: bool = True  # head=cosine: the scale is learned (starting at cosine_scale) or fixed
    evidential_anneal_epochs: Annotated[int, Field(ge=1)] = 10  # head=evidential: KL weight min(1, epoch/this)
    triplet_weight: Annotated[Float, Field(ge=0)] = 0.0  # batch-hard triplet loss on the embedding; 0 = off
    triplet_margin: Annotated[Float, Field(gt=0)] = 0.2  # on L2-normalized embeddings (Schroff et al. 2015)
    center_weight: Annotated[Float, Field(ge=0)] = 0.0  # center loss on the embedding (Wen et al. 2016); 0 = off
    center_alpha: Annotated[Float, Field(gt=0, le=1)] = 0.5  # center loss: the centres' update rate
    manifold_mixup: Annotated[Float, Field(ge=0)] = 0.0  # manifold mixup alpha (Verma et al. 2019); 0 = off


class ExplainConfig(_Section):
    method: CamMethod = "gradcam"
    target_layer: Text | None = None  # dotted module name; None: the deepest stage with >= 7 cells a side
    gallery_per_class: Annotated[int, Field(ge=0)] = 4  # correct and misclassified test images per class
    faithfulness_images: Annotated[int, Field(ge=0)] = 16  # test images for deletion/insertion; 0 = off
    faithfulness_methods: list[CamMethod] = Field(
        default_factory=lambda: ["gradcam", "gradcam++", "hirescam", "layercam", "eigencam"])


class FinetuneConfig(_Section):
    """Progressive fine-tuning in three phases: the head alone, then every layer with discriminative
    learning rates (lr × lr_decay^(depth from the top) per layer group), then every layer at a low lr."""

    progressive: bool = False
    head_epochs: Annotated[int, Field(ge=1)] = 1
    discriminative_epochs: Annotated[int, Field(ge=1)] = 1  # the rest of train.epochs is phase 3
    lr_decay: Annotated[Float, Field(gt=0, le=1)] = 0.5
    final_lr_scale: Annotated[Float, Field(gt=0, le=1)] = 0.1


Unit = Annotated[Float, Field(ge=0, le=1)]


class ChecklistConfig(_Section):
    """Validation checklist: each threshold set here gets a PASS/FAIL line in metrics.json and the report."""

    min_accuracy: Unit | None = None
    min_auc: Unit | None = None
    min_recall: Unit | None = None  # every class's recall (sensitivity)
    max_ece: Unit | None = None
    min_qwk: Annotated[Float, Field(ge=-1, le=1)] | None = None  # ordinal: quadratic weighted kappa
    min_refer_sensitivity: Unit | None = None  # ordinal: sensitivity for referable grades


Rate = Annotated[Float, Field(gt=0, le=1)]


class EvalConfig(_Section):
    """What the evaluation of a trained model measures beyond the task's metrics (medsight.evaluation.trust):
    calibration, operating points, selective prediction, conformal sets, TTA, subgroups and robustness."""

    calibrate: bool = True  # temperature scaling fitted on validation, stored in the checkpoint
    target_sensitivity: Rate | None = None  # operating point chosen on val for this sensitivity, in (0, 1]
    target_specificity: Rate | None = None  # ... or for this specificity; neither: Youden's J
    conformal_coverage: Fraction = 0.9  # split-conformal prediction sets for this coverage, in (0, 1)
    conformal_score: ConformalScore = "lac"  # lac (1 - p_true) | aps (adaptive prediction sets)
    conformal_class_conditional: bool = False  # one quantile per class (coverage per class, larger sets)
    abstain_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.1  # predict refers the least confident share of val
    tta: bool = False  # decide on the mean over test-time augmentation views (always measured against none)
    subgroups: list[Text] | None = None  # CSV manifest metadata columns; None: detected (sex, age, site, ...)
    subgroup_min_size: Annotated[int, Field(ge=2)] = 20  # smaller groups are reported but get no interval
    robustness: bool = False  # measure the metric under corruptions at the end of training (slower)
    bootstrap: Annotated[int, Field(ge=0)] = 1000  # resamples for the intervals of this section

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.target_sensitivity is not None and self.target_specificity is not None:
            raise ValueError("eval.target_sensitivity and eval.target_specificity both set: an operating point "
                             "has one target; set one of them (or neither, for Youden's J)")
        return self


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    checklist: ChecklistConfig = Field(default_factory=ChecklistConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    out: Text = ""  # run folder; empty: runs/MODEL-TIMESTAMP
    plan: bool = True  # derive every option the user did not set from the data (medsight.planning)

    # dotted keys the user set (YAML, --set, flags, or Python arguments): the plan never changes them
    _explicit: frozenset[str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_ordinal(self) -> Config:
        ordinal = self.data.task == "ordinal"
        if self.train.monitor == "qwk" and not ordinal:
            raise ValueError("train.monitor=qwk (quadratic weighted kappa) needs graded labels: set data.task=ordinal")
        for key, on in (("checklist.min_qwk", self.checklist.min_qwk is not None),
                        ("checklist.min_refer_sensitivity", self.checklist.min_refer_sensitivity is not None)):
            if on and not ordinal:
                raise ValueError(f"{key} needs graded labels: set data.task=ordinal")
        if ordinal and self.train.ordinal in ("corn", "regression") and (self.train.mixup or self.train.cutmix):
            raise ValueError(f"train.ordinal={self.train.ordinal} learns from whole grades; mixup/cutmix mix "
                             f"them into fractions: turn train.mixup and train.cutmix off, or use ce/smooth")
        return self

    @model_validator(mode="after")
    def _check_multilabel(self) -> Config:
        multi, t = self.data.task == "multilabel", self.train
        if t.loss in ("bce", "asl") and self.data.task in ("single_label", "ordinal"):
            raise ValueError(f"train.loss={t.loss} is a multi-label loss (a sigmoid per finding); with "
                             f"data.task={self.data.task} use ce or focal")
        if t.monitor == "map" and not multi:
            raise ValueError("train.monitor=map (mean average precision over findings) needs multi-label data: "
                             "set data.task=multilabel")
        if multi and (t.mixup or t.cutmix):
            raise ValueError("train.mixup/cutmix mix one class per image; multi-label findings are not mixed: "
                             "turn them off with data.task=multilabel")
        return self

    @model_validator(mode="after")
    def _check_techniques(self) -> Config:
        t, kind = self.train, self.data.task
        aux = [k for k, on in (("train.triplet_weight", t.triplet_weight), ("train.center_weight", t.center_weight)) if on]
        if aux and t.batch_size < 2:
            raise ValueError(f"{aux[0]}: a batch of {t.batch_size} image holds one class, and the loss compares "
                             f"an image with the others of its batch; set train.batch_size >= 2")
        if t.head == "prototypical" and self.data.shots == 1:
            raise ValueError("train.head=prototypical trains on episodes of support and query images: --shots "
                             "(data.shots) must be at least 2")
        if t.manifold_mixup and (t.mixup or t.cutmix):
            raise ValueError("train.manifold_mixup mixes hidden states; train.mixup/cutmix mix input images: "
                             "switch one of them on, not both")
        if t.manifold_mixup and t.accum_steps > 1:
            raise ValueError("train.manifold_mixup pairs images within a batch; it needs train.accum_steps=1")
        ordinal_whole = kind == "ordinal" and t.ordinal in ("corn", "regression")
        if t.manifold_mixup and (kind == "multilabel" or ordinal_whole):
            raise ValueError(f"train.manifold_mixup mixes one class per image into fractions; it does not fit "
                             f"data.task={kind}" + (f" with train.ordinal={t.ordinal}" if ordinal_whole else ""))
        if kind in ("multilabel", "ordinal"):
            _check_kind(self, kind)
        return self

    @model_validator(mode="after")
    def _check(self) -> Config:
        f, t = self.finetune, self.train
        if f.progressive:
            if f.head_epochs + f.discriminative_epochs > t.epochs:
                raise ValueError(f"finetune: {f.head_epochs} head + {f.discriminative_epochs} discriminative "
                                 f"epochs exceed train.epochs={t.epochs}")
            if self.model.freeze_stages:
                raise ValueError("finetune.progressive decides what trains; leave model.freeze_stages at 0")
            if t.head == "prototypical":
                raise ValueError("finetune.progressive trains the head alone first; the prototype head "
                                 "(train.head=prototypical) has no weights to train: turn one of them off")
        return self


def _check_kind(cfg: Config, kind: str) -> None:
    """The techniques that need one class per image (or, for the evidential and prototype heads, an unordered
    single-label task) against the task kind; raises ValueError naming the option. Called by the config's own
    validation when data.task is set, and again by training once ``auto`` is resolved from the data."""
    t = cfg.train
    if t.head in ("evidential", "prototypical") and kind != "single_label":
        raise ValueError(f"train.head={t.head} is built for one class per image (single_label), not "
                         f"data.task={kind}; use train.head=linear or cosine")
    for key, on in (("train.triplet_weight", t.triplet_weight), ("train.center_weight", t.center_weight),
                    ("data.shots", cfg.data.shots)):
        if on and kind == "multilabel":
            raise ValueError(f"{key} needs one class per image; multi-label findings have none: leave it off "
                             f"with data.task=multilabel")


def check_task_kind(cfg: Config, kind: str) -> None:
    """:func:`_check_kind` for a resolved task kind, raising :class:`ConfigError` (before any training)."""
    try:
        _check_kind(cfg, kind)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ----------------------------------------------------------------------------------------------- errors

def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _section_at(loc: Sequence[Any]) -> type[BaseModel]:
    cls: type[BaseModel] = Config
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
    return cls


def _message(err: dict[str, Any]) -> str:
    """One pydantic error as medsight's one-line message: the dotted key, what was wrong, a suggestion."""
    loc = [str(p)[:80] for p in err["loc"] if not isinstance(p, int)]
    key, kind, value, ctx = ".".join(loc), err["type"], err.get("input"), err.get("ctx") or {}
    shown = f"{type(value).__name__} {_clip(value)}"
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'.{_suggest(loc[-1], _section_at(loc[:-1]).model_fields)}"
    if kind == "literal_error":
        allowed = [a.strip().strip("'") for a in str(ctx.get("expected", "")).replace(" or ", ", ").split(",")]
        return f"{key} must be one of {', '.join(allowed)}; got {_clip(value)}.{_suggest(str(value)[:80], allowed)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{key}: expected an integer, got {shown}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{key}: expected true or false, got {shown}"
    if kind in ("float_type", "float_parsing"):
        return f"{key}: expected a number, got {shown}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {_clip(value)}"
    if kind in ("string_type",):
        return f"{key}: expected a string, got {shown}"
    if kind in ("list_type",):
        return f"{key}: expected a list, got {shown}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key or 'config'}: expected a mapping, got {shown}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{key} must be {bounds[kind]} {limit}, got {_clip(value)}"
    if kind == "value_error":
        text = str(ctx.get("error", err["msg"]))
        return text if len(text) <= 500 else text[:500] + "..."
    return f"{key}: {err['msg']} (got {_clip(value)})"


def _validate(data: Any) -> Config:
    try:
        return Config.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors()[0])) from None


# ------------------------------------------------------------------------------------------ public API

def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested plain data, rejecting unknown keys, wrong types and bad values."""
    return _validate(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump()


def _leaf_keys(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    keys: set[str] = set()
    for k, v in data.items():
        keys |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def _fields_set(model: BaseModel, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        keys |= _fields_set(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else {f"{prefix}{name}"}
    return keys


def explicit_keys(cfg: Config) -> frozenset[str]:
    """The dotted keys the user set: from a YAML file, ``--set``, CLI flags, or Python constructor arguments."""
    return cfg._explicit if cfg._explicit is not None else frozenset(_fields_set(cfg))


def _mark(cfg: Config, keys: frozenset[str]) -> Config:
    cfg._explicit = keys
    return cfg


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys set (``{"out": "runs/x", "optim.lr": 0.1}``)."""
    data = config_to_dict(cfg)
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return _mark(_validate(data), explicit_keys(cfg))


def _takes_text_only(annotation: Any) -> bool:
    """Whether a field's scalar values are all strings (``Text``, a ``Literal`` of names, either or None)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_text_only(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_takes_text_only(a) for a in args)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    return annotation is str


def _override_value(key: str, raw: str, text_field: bool) -> Any:
    """A ``--set`` value: YAML 1.2 (:func:`read_yaml`), read as the field's type. A text field (a path, a
    name) keeps what was typed when YAML would read a number or a boolean (``data.path=0777`` stays
    ``"0777"``); numbers are decimal (``010`` is 10; ``1:30`` and ``0x1`` are not numbers)."""
    if raw.strip() == "":
        return None
    if re.search(r"(^|[\s\[{,:])!", raw):  # a YAML tag: no --set value needs one, and they can build objects
        raise ConfigError(f"--set {key}: {_clip(raw)} carries a YAML tag ('!...'); give a plain value")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as exc:  # broken YAML, an anchor or alias
        raise ConfigError(f"--set {key}: {_clip(raw)} is not a plain YAML value ({_yaml_error(exc)})") from None
    if text_field and isinstance(value, (bool, int, float)):
        return raw.strip()
    return value


def _field(parts: Sequence[str]) -> Any:
    """The annotation of the field at dotted ``parts`` (None when there is none)."""
    field = _section_at(parts[:-1]).model_fields.get(parts[-1])
    return field.annotation if field is not None else None


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``key=value`` strings (dotted keys, YAML 1.2 values read as the field's type) on top of ``cfg``."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {_clip(item)}")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                where = ".".join(parts[:i])
                sections = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"unknown config section {_clip('.'.join(parts[: i + 1]))}"
                                  f"{' in ' + where if where else ''}.{_suggest(part[:80], sections)}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {_clip(key)}.{_suggest(parts[-1][:80], node)}")
        node[parts[-1]] = _override_value(key, raw, _takes_text_only(_field(parts)))
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    return _mark(_validate(data), explicit_keys(cfg) | keys)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    The file is read by YAML 1.2 rules without anchors or aliases (:func:`read_yaml`); one larger than
    ``MAX_CONFIG_BYTES`` is refused before it is parsed."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES:,} bytes: not a medsight config")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not a text file (not UTF-8 YAML)") from None
        try:
            data = read_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_error(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
        cfg = _mark(config_from_dict(data), frozenset(_leaf_keys(data)))
    return apply_overrides(cfg, overrides)


def validate_config(cfg: Config) -> Config:
    """Check ``cfg`` again (a config built in Python may have skipped validation) and warn about settings
    that run but are probably not meant; returns the validated config."""
    cfg = _mark(_validate(config_to_dict(cfg)), explicit_keys(cfg))
    o, t, d = cfg.optim, cfg.train, cfg.data
    if "sam" in o.name and o.adaptive and not 0.01 <= o.rho <= 10:
        warnings.warn(f"optim.rho={o.rho} is outside the usual range for adaptive SAM (0.01-10; the ASAM paper "
                      f"uses 0.5-2)", stacklevel=2)
    if t.grad_scaler and t.precision != "fp16":
        warnings.warn(f"train.grad_scaler is only for fp16; ignored with precision {t.precision}", stacklevel=2)
    if d.pretext == "rotation":
        clashing = [name for name, on in (("data.hflip", d.hflip), ("data.rotate_degrees > 45", d.rotate_degrees > 45),
                                          (f"data.auto_augment={d.auto_augment}", d.auto_augment != "none")) if on]
        if clashing:
            warnings.warn(f"{', '.join(clashing)} with the rotation pretext blur its labels (a flipped 90° turn "
                          f"looks like a 270° turn); turn them off for pretraining", stacklevel=2)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), path)
