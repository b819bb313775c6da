"""The plan: every training option derived from the fingerprint by rules written down in one place.

Each rule is a small function of the fingerprint that returns its decisions with the reason. The rules
read only the data — never the machine — so the same data gives the same plan anywhere; the one
machine-dependent step, fitting a time budget (:mod:`medsight.engine.budget`), is saved with the run
so it can be repeated exactly. Anything the user set (YAML, ``--set``, a flag) wins over the plan.

How the numbers were chosen (README, "The plan"): the optimizer-step target keeps the embedded
PneumoniaMNIST default exactly as it was measured (4 epochs of 74 steps) and gives small sets more
epochs instead of fewer steps; the CNN/CoAtNet line follows the CoAtNet paper's finding that
convolution's inductive bias wins on small data and attention pays off as data grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medsight.config import Config, explicit_keys, with_values
from medsight.data import load_data
from medsight.data.cache import cache_preprocessing
from medsight.planning.fingerprint import Fingerprint, fingerprint
from medsight.tasks import build_task

__all__ = ["Decision", "Plan", "make_plan", "apply_plan", "epoch_dependent", "RULES", "TARGET_STEPS", "CNN_BELOW",
           "COATNET0_FROM", "MAX_EPOCHS", "plan_for", "adopt_cache", "plan_preprocessing", "CACHE_KEYS"]

#: Optimizer steps a plan aims at (small sets: more epochs); the default set gets 300/74 -> 4 epochs.
TARGET_STEPS = 300
MIN_EPOCHS, MAX_EPOCHS = 4, 200
#: Fewer training images than this: a CNN (ResNet-18); from it on, a CoAtNet.
CNN_BELOW = 2_000
#: From this many training images, the paper's CoAtNet-0 instead of the 1M-parameter tiny one.
COATNET0_FROM = 20_000
#: Base learning rate of the AdamW family at batch 64 (linear scaling with the batch, Goyal et al. 2017).
BASE_LR, BASE_BATCH = 2e-3, 64
#: Images whose aspect lies within this factor of 1 are resized as they are (at most ~10% stretch, less than
#: the random resized crop's own); others are letterboxed (data.resize=pad) so no anatomy is stretched or cut.
SQUARE_ENOUGH = 1.1


@dataclass(frozen=True)
class Decision:
    key: str
    value: Any
    reason: str


@dataclass
class Plan:
    fingerprint: Fingerprint
    decisions: list[Decision] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)  # what the user set instead

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint.as_dict(),
                "decisions": [d.__dict__ for d in self.decisions], "user_set": [d.__dict__ for d in self.kept]}

    def lines(self) -> list[str]:
        fp = self.fingerprint
        out = [f"fingerprint: {fp.n_train} training images · {len(fp.classes)} classes · {fp.task} · source "
               f"{fp.image_side} px (median shorter side), {'colour' if fp.channels == 3 else 'grayscale'} · "
               f"imbalance {fp.imbalance:g}:1"]
        out += [f"plan: {d.key} = {d.value}  ({d.reason})" for d in self.decisions]
        out += [f"plan: {d.key} = {d.value}  (set by you; the plan would say {d.reason})" for d in self.kept]
        return out


def _ceil32(x: float) -> int:
    return int(math.ceil(x / 32) * 32)


#: The config keys a prepared cache fixes, and the names its manifest gives them.
CACHE_KEYS = {"data.image_size": "size", "data.resize": "resize", "data.preset": "preset", "data.graham": "graham"}


def _from_cache(fp: Fingerprint, key: str) -> Decision | None:
    """A prepared cache's value for ``key``: its images went through it, so the plan keeps it."""
    if not fp.prepared or CACHE_KEYS[key] not in fp.prepared:
        return None
    return Decision(key, fp.prepared[CACHE_KEYS[key]], "the prepared cache's images were made so")


def rule_image_size(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    cached = _from_cache(fp, "data.image_size")
    if cached is not None:
        return [cached]
    size = min(_ceil32(max(fp.image_side, 64)), 224)
    mixed = "; sizes and channels differ between images: every one is resized to it, grayscale to 3 channels" \
        if fp.mixed else ""
    why = ("source images are small: up-sampled to 64, the smallest size CoAtNet's attention windows tile"
           if fp.image_side <= 64 else "the source size, a multiple of 32" if size < 224
           else "large source images: the standard 224")
    return [Decision("data.image_size", size, why + mixed)]


def rule_backbone(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    if fp.n_train < CNN_BELOW:
        return [Decision("model.name", "resnet18", f"{fp.n_train} < {CNN_BELOW:,} training images: a CNN's "
                                                   f"inductive bias generalizes better on little data")]
    if fp.n_train < COATNET0_FROM:
        return [Decision("model.name", "coatnet_tiny", f"{CNN_BELOW:,}-{COATNET0_FROM:,} training images: "
                                                       f"convolution + attention, 1M parameters")]
    return [Decision("model.name", "coatnet_0", f">= {COATNET0_FROM:,} training images: CoAtNet-0's attention "
                                                f"stages pay off at this scale")]


def rule_batch(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    if fp.n_train >= 16 * BASE_BATCH:
        return [Decision("train.batch_size", BASE_BATCH, "the default batch")]
    batch = max(8, 2 ** int(math.log2(max(1, fp.n_train // 16))))
    return [Decision("train.batch_size", batch, f"at least 16 steps per epoch on {fp.n_train} images")]


def epoch_dependent(epochs: int) -> list[Decision]:
    """The decisions that follow from the epoch count (re-derived when a time budget changes it)."""
    warmup = 1 if epochs <= 20 else round(0.05 * epochs)
    patience = max(5, epochs // 3) if epochs >= 15 else 0
    return [Decision("schedule.warmup_epochs", warmup, "linear warm-up: 1 epoch, or 5% of a long run"),
            Decision("train.patience", patience, "early stopping after a third of the epochs without a better "
                                                 "validation score" if patience else "too few epochs to stop early")]


def rule_schedule(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    batch = chosen["train.batch_size"]
    steps = math.ceil(fp.n_train / batch)
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_STEPS / steps)))
    return [Decision("train.epochs", epochs, f"about {TARGET_STEPS} optimizer steps ({steps} per epoch), "
                                             f"{MIN_EPOCHS}-{MAX_EPOCHS} epochs"),
            Decision("optim.lr", BASE_LR * batch / BASE_BATCH, f"{BASE_LR:g} at batch {BASE_BATCH}, scaled "
                                                               f"linearly with the batch"),
            *epoch_dependent(epochs)]


def rule_augmentation(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    if fp.n_train < CNN_BELOW:
        return [Decision("data.rotate_degrees", 10.0, "small data set: stronger augmentation (rotation)"),
                Decision("data.rrc_scale", 0.85, "small data set: stronger augmentation (random resized crop)")]
    return [Decision("data.rotate_degrees", 0.0, "enough data: flips only"),
            Decision("data.rrc_scale", 1.0, "enough data: no cropping")]


def rule_imbalance(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    ratio = f"imbalance {fp.imbalance:g}:1"
    if fp.task == "multilabel":  # each finding is its own binary problem: weigh its positives, not classes
        return [Decision("train.class_weights", True, "multi-label: per-finding positive weights (negatives / "
                                                      "positives in training), so rare findings are not ignored"),
                Decision("train.class_weight_mode", "inverse", "(multi-label: unused, the weights are per finding)")]
    if fp.imbalance >= 10:
        return [Decision("train.class_weights", True, f"{ratio}: rare classes would be ignored without weights"),
                Decision("train.class_weight_mode", "effective", "effective-number weights (Cui et al. 2019): "
                                                                 "inverse weights explode for very rare classes")]
    if len(fp.classes) == 2:
        return [Decision("train.class_weights", True, f"{ratio}, two classes: the finding is usually the minority "
                                                      f"and its sensitivity matters"),
                Decision("train.class_weight_mode", "inverse", "inverse-frequency weights")]
    return [Decision("train.class_weights", False, f"{ratio} over {len(fp.classes)} classes: weights would trade "
                                                   f"accuracy for balanced accuracy; both are reported"),
            Decision("train.class_weight_mode", "inverse", "(unused without weights)")]


#: SAM-only settings: a user who set one of them asked for SAM, so the small-data rule keeps the optimizer.
SAM_KEYS = ("optim.rho", "optim.adaptive", "optim.sam_bn", "optim.sam_sync_first_pass", "optim.looksam_k",
            "optim.looksam_alpha", "optim.looksam_layerwise")


def rule_small_data(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    """Small sets train with AdamW and decide on the test-time-augmentation mean. The evidence (README,
    "Techniques and the evidence"): on the panel's three sets under 2,000 training images SAM gained nowhere
    (worse on the 500-image row's accuracy beyond the spread) and cost 1.3-1.5x the run time; TTA raised the
    AUC on all three, and on the 4,708-image PneumoniaMNIST it cost accuracy: larger sets keep SAM, without TTA."""
    if fp.n_train >= CNN_BELOW:
        return [Decision("optim.name", "sam-adamw", f">= {CNN_BELOW:,} training images: SAM (flat minima) on AdamW"),
                Decision("eval.tta", False, "enough data: decisions on the image as it is")]
    sam_set = [k for k in SAM_KEYS if k in chosen]
    optim = ([Decision("optim.name", chosen.get("optim.name", "sam-adamw"), f"you set {sam_set[0]}, a SAM "
                                                                           f"setting: SAM kept")] if sam_set else
             [Decision("optim.name", "adamw", f"{fp.n_train} < {CNN_BELOW:,} training images: SAM gained on none of "
                                              f"the small sets measured and costs 1.3-1.5x the time")])
    return [*optim, Decision("eval.tta", True, "small data set: decisions on the mean over test-time augmentation "
                                               "views (AUC gained on every small set measured)")]


def rule_resize(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    cached = _from_cache(fp, "data.resize")
    if cached is not None:
        return [cached]
    if fp.mixed or not 1 / SQUARE_ENOUGH <= fp.aspect <= SQUARE_ENOUGH:
        return [Decision("data.resize", "pad", f"images are not all square (median aspect {fp.aspect:.2f}"
                                               f"{', mixed sizes' if fp.mixed else ''}): letterboxed, so nothing is "
                                               f"stretched or cut off")]
    return [Decision("data.resize", "squash", f"square images (median aspect {fp.aspect:.2f}): resized as they are")]


def rule_monitor(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    present = sum(1 for c in fp.counts.get("val", []) if c > 0)
    if fp.task == "ordinal" and present >= 2:
        return [Decision("train.monitor", "qwk", "graded labels: quadratic weighted kappa, the grading metric "
                                                 "(a grade-4 eye called 3 costs less than one called 0)")]
    if fp.task == "multilabel":
        if not present:
            return [Decision("train.monitor", "loss", "no finding has a positive validation image: no AUC to select "
                                                      "by, so the validation loss")]
        return [Decision("train.monitor", "auc", f"mean validation AUC over the {present} findings with validation "
                                                 f"positives (threshold-free, robust to rare findings)")]
    if present < 2:
        return [Decision("train.monitor", "loss", f"the validation split holds {present} class(es): no AUC to "
                                                  f"select by, so the validation loss")]
    return [Decision("train.monitor", "auc", "threshold-free and robust to class imbalance")]


def rule_ordinal_head(fp: Fingerprint, chosen: dict[str, Any]) -> list[Decision]:
    if fp.task != "ordinal":
        return []
    mixing = [k for k in ("train.mixup", "train.cutmix", "train.manifold_mixup") if chosen.get(k)]
    if mixing:
        return [Decision("train.ordinal", "smooth", f"graded labels with {mixing[0]} set: CORN learns whole grades, "
                                                    f"so distance-aware smoothing, which takes mixed grades")]
    return [Decision("train.ordinal", "corn", "graded labels: CORN's conditional binary outputs measured +0.059 QWK "
                                              "over cross-entropy on RetinaMNIST (3 seeds; README, Grading)")]


#: The rules in the order they run (later rules may read earlier decisions through ``chosen``).
RULES: list[Callable[[Fingerprint, dict[str, Any]], list[Decision]]] = [
    rule_image_size, rule_backbone, rule_batch, rule_schedule, rule_augmentation, rule_small_data, rule_imbalance,
    rule_resize, rule_monitor, rule_ordinal_head]


def make_plan(fp: Fingerprint, cfg: Config) -> Plan:
    """The plan for ``fp``; decisions on keys the user set in ``cfg`` are kept aside, the user's value wins
    (and later rules read the user's value)."""
    user = explicit_keys(cfg)
    # rules may read what the user set (e.g. mixup, which rules out CORN), as well as earlier decisions
    plan, chosen = Plan(fp), {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])
                              for k in user if k.count(".") == 1 and k.split(".")[0] in type(cfg).model_fields}
    for rule in RULES:
        for d in rule(fp, chosen):
            if d.key in user:
                section, name = d.key.split(".")
                value = getattr(getattr(cfg, section), name)
                plan.kept.append(Decision(d.key, value, f"{d.value}: {d.reason}"))
                chosen[d.key] = value
            else:
                plan.decisions.append(d)
                chosen[d.key] = d.value
    return plan


def apply_plan(cfg: Config, plan: Plan) -> Config:
    return with_values(cfg, {d.key: d.value for d in plan.decisions})


def adopt_cache(cfg: Config) -> Config:
    """A run from a prepared cache (``data.cache``) takes the cache's preprocessing (size, resize, preset,
    Graham) for every key the user did not set; a key the user set to another value is refused when the
    cache is opened, naming it."""
    pre = cache_preprocessing(cfg.data.cache) if cfg.data.cache else None
    if pre is None:
        return cfg
    user = explicit_keys(cfg)
    values = {k: pre[name] for k, name in CACHE_KEYS.items() if k not in user and name in pre}
    return with_values(cfg, values) if values else cfg


def plan_preprocessing(cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with the image size and resize policy that ``train`` would plan for its data (keys the user
    set are kept), and lines saying which: ``medsight prepare`` caches what training will use."""
    if not cfg.plan:
        return cfg, []
    plan = plan_for(cfg)
    keys = ("data.image_size", "data.resize")
    chosen = {d.key: d.value for d in plan.decisions if d.key in keys}
    lines = [f"plan: {d.key} = {d.value}  ({d.reason})" for d in plan.decisions if d.key in keys]
    lines += [f"{d.key} = {d.value}  (set by you)" for d in plan.kept if d.key in keys]
    return (with_values(cfg, chosen) if chosen else cfg), lines


def plan_for(cfg: Config) -> Plan:
    """Read ``cfg``'s data and make its plan (what ``medsight plan`` prints; training makes the same one)."""
    cfg = adopt_cache(cfg)
    bundle = load_data(cfg.data)
    task = build_task(cfg.data.task, bundle.classes, bundle.splits["train"].labels)
    return make_plan(fingerprint(bundle, task.kind), cfg)
