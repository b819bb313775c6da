"""The plan from the data: fingerprint, rules, the user's settings winning, the time budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from medsight.cli import main
from medsight.config import Config, apply_overrides, config_to_dict, load_config
from medsight.data import DataBundle, SplitData
from medsight.engine import train
from medsight.engine.budget import BudgetError
from medsight.planning import apply_plan, fingerprint, make_plan, plan_for
from medsight.planning.planner import CNN_BELOW, COATNET0_FROM

from conftest import write_class_folders


def bundle_of(n_train: int, classes: int = 2, side: int = 28, channels: int = 1, val_classes: int | None = None):
    rng = np.random.default_rng(0)
    shape = (side, side) if channels == 1 else (side, side, channels)

    def split(n: int, k: int) -> SplitData:
        return SplitData(labels=np.arange(n) % k, images=rng.integers(0, 255, (n, *shape), dtype=np.uint8))

    return DataBundle(classes=[str(i) for i in range(classes)], source="synthetic",
                      splits={"train": split(n_train, classes), "val": split(40, val_classes or classes),
                              "test": split(40, classes)})


def test_the_embedded_default_plans_to_the_measured_defaults():
    """The plan on PneumoniaMNIST is exactly the recipe whose figures the README reports."""
    cfg = Config()
    plan = plan_for(cfg)
    assert config_to_dict(apply_plan(cfg, plan)) == config_to_dict(cfg)
    assert {d.key: d.value for d in plan.decisions}["model.name"] == "coatnet_tiny"


@pytest.mark.parametrize("n, model, epochs", [(300, "resnet18", 16), (1080, "resnet18", 18), (4708, "coatnet_tiny", 4),
                                               (50_000, "coatnet_0", 4)])
def test_rules_scale_with_the_data(n, model, epochs):
    chosen = {d.key: d.value for d in make_plan(fingerprint(bundle_of(n), "single_label"), Config()).decisions}
    assert chosen["model.name"] == model
    assert chosen["train.epochs"] == epochs
    steps = -(-n // chosen["train.batch_size"])
    assert 16 <= steps or chosen["train.batch_size"] == 8
    assert abs(chosen["train.epochs"] * steps - 300) <= steps or chosen["train.epochs"] == 4
    assert (n < CNN_BELOW) == (chosen["data.rotate_degrees"] > 0)
    assert (n >= COATNET0_FROM) == (model == "coatnet_0")


@pytest.mark.parametrize("n", [300, CNN_BELOW - 1, CNN_BELOW, 50_000])
def test_small_sets_train_with_adamw_and_decide_on_tta(n):
    chosen = {d.key: d.value for d in make_plan(fingerprint(bundle_of(n), "single_label"), Config()).decisions}
    small = n < CNN_BELOW
    assert chosen["optim.name"] == ("adamw" if small else "sam-adamw")
    assert chosen["eval.tta"] is small


def test_the_small_data_rule_keeps_sam_when_the_user_asked_for_it():
    fp = fingerprint(bundle_of(300), "single_label")
    for sets, name in ((["optim.rho=0.1"], "sam-adamw"), (["optim.name=sgd"], "sgd"),
                       (["optim.name=looksam-sgd", "optim.looksam_k=3"], "looksam-sgd")):
        cfg = apply_overrides(Config(), sets)
        plan = make_plan(fp, cfg)
        assert apply_plan(cfg, plan).optim.name == name, sets
        assert {d.key: d.value for d in plan.decisions}["eval.tta"] is True  # TTA is decided apart from SAM
    kept = make_plan(fp, apply_overrides(Config(), ["eval.tta=false"]))
    assert "eval.tta" not in {d.key for d in kept.decisions} and apply_plan(Config(), kept).optim.name == "adamw"


def test_the_plan_is_deterministic_and_the_user_wins():
    fp = fingerprint(bundle_of(1080, classes=5, channels=3), "single_label")
    a = make_plan(fp, Config())
    assert a.as_dict() == make_plan(fp, Config()).as_dict()
    cfg = apply_overrides(Config(), ["model.name=coatnet_tiny", "train.batch_size=32"])
    b = make_plan(fp, cfg)
    decided = {d.key: d.value for d in b.decisions}
    kept = {d.key: d.value for d in b.kept}
    assert "model.name" not in decided and kept["model.name"] == "coatnet_tiny"
    assert decided["train.epochs"] == round(300 / 34) and decided["optim.lr"] == pytest.approx(1e-3)  # reads batch 32
    assert apply_plan(cfg, b).model.name == "coatnet_tiny"


def test_imbalance_and_a_one_class_validation_split_change_the_policy():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 990 + [1] * 60)
    b = bundle_of(1050, val_classes=1)
    b.splits["train"] = SplitData(labels=labels, images=rng.integers(0, 255, (1050, 28, 28), dtype=np.uint8))
    chosen = {d.key: d.value for d in make_plan(fingerprint(b, "single_label"), Config()).decisions}
    assert chosen["train.class_weight_mode"] == "effective" and chosen["train.class_weights"]  # 16.5:1
    assert chosen["train.monitor"] == "loss"  # no validation AUC to select by


def test_class_weights_for_two_classes_but_not_for_several_mildly_imbalanced_ones():
    two = {d.key: d.value for d in make_plan(fingerprint(bundle_of(1080), "single_label"), Config()).decisions}
    five = {d.key: d.value for d in make_plan(fingerprint(bundle_of(1080, classes=5), "single_label"),
                                              Config()).decisions}
    assert two["train.class_weights"] is True and five["train.class_weights"] is False


def test_mixed_sizes_and_channels_are_fingerprinted_from_headers(tmp_path):
    root = tmp_path / "d"
    for i, (size, mode) in enumerate([((300, 200), "L"), ((400, 300), "RGB"), ((320, 240), "L")] * 4):
        for cls in ("a", "b"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new(mode, size).save(root / cls / f"{i}.png")
    from medsight.data import load_data
    from medsight.config import DataConfig

    fp = fingerprint(load_data(DataConfig(path=str(root), val_fraction=0.25, test_fraction=0.25)), "single_label")
    assert fp.mixed and fp.sampled == fp.n_train and fp.image_side in (200, 240, 300)
    size = {d.key: d.value for d in make_plan(fp, Config()).decisions}["data.image_size"]
    assert size == min(224, -(-fp.image_side // 32) * 32) and "sizes and channels differ" in str(make_plan(fp, Config()).lines())


def test_medsight_plan_prints_without_training(tmp_path, capsys):
    data = write_class_folders(tmp_path / "images", n_per_class=12)
    assert main(["plan", "--data", str(data), "--set", "train.epochs=7"]) == 0
    out = capsys.readouterr().out
    assert "fingerprint: " in out and "model.name = resnet18" in out
    assert "train.epochs = 7  (set by you" in out
    assert not any(tmp_path.glob("**/best.pt"))
    assert main(["plan", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"]["n_train"] > 0


def test_a_planned_run_saves_its_plan_and_can_be_repeated(tmp_path):
    data = write_class_folders(tmp_path / "images", n_per_class=12)
    out = tmp_path / "run"
    cfg = apply_overrides(Config(), [f"data.path={data}", f"out={out}", "data.image_size=32", "train.epochs=1",
                                     "train.sharpness_batches=0", "explain.faithfulness_images=0",
                                     "explain.gallery_per_class=1"])
    train(cfg, progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    plan = json.loads((out / "plan.json").read_text())
    decided = {d["key"]: d["value"] for d in plan["decisions"]}
    assert saved["model"]["name"] == decided["model.name"] == "resnet18"
    assert saved["data"]["rotate_degrees"] == 10.0 and saved["train"]["epochs"] == 1  # the user's epochs
    # a small set: AdamW, and decisions on the test-time augmentation mean, which the run's trust section uses
    assert saved["optim"]["name"] == decided["optim.name"] == "adamw" and saved["eval"]["tta"] is True
    assert json.loads((out / "metrics.json").read_text())["trust"]["tta"]["used_for_decisions"] is True
    again = load_config(out / "config.yaml")
    assert config_to_dict(apply_plan(again, make_plan(fingerprint_of(again), again))) == config_to_dict(again)


def fingerprint_of(cfg):
    from medsight.data import load_data

    return fingerprint(load_data(cfg.data), "single_label")


def test_time_budget_fits_the_epochs_and_is_saved_as_epochs(tmp_path, small_npz, monkeypatch):
    import medsight.engine.budget as budget

    # the machine's speed, fixed so the arithmetic is exact: 0.01 s per step, 0.001 s per evaluated image
    monkeypatch.setattr(budget, "measure_speed", lambda run, steps=3: (0.01, 0.001))
    out = tmp_path / "run"
    cfg = apply_overrides(Config(), [f"data.path={small_npz}", f"out={out}", "data.image_size=32", "plan=false",
                                     "train.time_budget=1s", "train.sharpness_batches=0",
                                     "explain.faithfulness_images=0", "explain.gallery_per_class=1"])
    result = train(cfg, progress=False)
    fit = json.loads((out / "plan.json").read_text())["time_budget"]
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    # one step per epoch + 12 validation images = 0.022 s; finish = 12 test images + 30 steps = 0.312 s
    assert fit["epochs"] == int((1 * budget.SAFETY - 0.312) / 0.022) == 24
    assert saved["time_budget"] is None and saved["epochs"] == 24 == len(result.history)


def test_speed_is_measured_on_a_copy_leaving_the_run_untouched(tmp_path, small_npz):
    import torch

    from medsight.engine.budget import measure_speed
    from medsight.engine.build import build_run
    from medsight.engine.distributed import DistInfo

    cfg = apply_overrides(Config(), [f"data.path={small_npz}", f"out={tmp_path / 'run'}", "data.image_size=32",
                                     "plan=false"])
    run = build_run(cfg, tmp_path / "run", DistInfo(), torch.device("cpu"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = torch.get_rng_state()
    step, per_image = measure_speed(run)
    assert step > 0 and per_image > 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_budget_too_short_for_one_epoch_says_how_much_is_needed(tmp_path, small_npz):
    cfg = apply_overrides(Config(), [f"data.path={small_npz}", f"out={tmp_path / 'run'}", "data.image_size=32",
                                     "plan=false", "train.time_budget=0.01"])
    with pytest.raises(BudgetError, match=r"one epoch takes about .* at least \d+s"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_graded_labels_select_by_kappa_and_oblong_images_are_letterboxed(tmp_path):
    fp = fingerprint(bundle_of(1080, classes=5, channels=3), "ordinal")
    chosen = {d.key: d.value for d in make_plan(fp, Config()).decisions}
    assert chosen["train.monitor"] == "qwk" and chosen["data.resize"] == "squash"
    assert {d.key: d.value for d in make_plan(fingerprint(bundle_of(1080, classes=5), "single_label"),
                                              Config()).decisions}["train.monitor"] == "auc"
    root = tmp_path / "wide"  # fundus-like 3:2 photographs
    for i in range(8):
        for cls in ("a", "b"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (90, 60)).save(root / cls / f"{i}.png")
    from medsight.config import DataConfig
    from medsight.data import load_data

    wide = fingerprint(load_data(DataConfig(path=str(root), val_fraction=0.25, test_fraction=0.25)), "single_label")
    decisions = {d.key: d for d in make_plan(wide, Config()).decisions}
    assert decisions["data.resize"].value == "pad" and "1.50" in decisions["data.resize"].reason
    user = make_plan(wide, apply_overrides(Config(), ["data.resize=crop"]))  # the user's policy wins
    assert "data.resize" not in {d.key for d in user.decisions}
