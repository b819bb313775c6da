"""Training techniques: losses, class weights, augmentations, freezing, mixup, recipes and dry runs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medsight.cli import main
from medsight.config import Config, ConfigError, DataConfig, apply_overrides, load_config, validate_config
from medsight.data import Clahe, make_transform
from medsight.losses import ClassificationLoss, class_weights
from medsight.models import ModelError, create_model, freeze_stages
from medsight.engine import train

from conftest import tiny_overrides, write_class_folders

RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_ce_matches_torch_with_weights_and_smoothing():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 4), torch.randint(0, 4, (12,))
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    for smoothing in (0.0, 0.1):
        ref = nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)(logits, y)
        torch.testing.assert_close(ClassificationLoss(weight=w, label_smoothing=smoothing)(logits, y), ref)


def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    y = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)[[0, 1], [0, 1]]
    expected = (-(1 - p) ** 3 * torch.log(p)).mean()
    torch.testing.assert_close(ClassificationLoss(gamma=3.0)(logits, y), expected)
    # alpha acts as per-class weights (weighted mean, as torch does for weights)
    alpha = torch.tensor([0.25, 0.75])
    per = -(1 - p) ** 3 * torch.log(p) * alpha
    torch.testing.assert_close(ClassificationLoss(gamma=3.0, alpha=alpha)(logits, y), per.sum() / alpha.sum())
    # soft targets (mixup) without weights equal timm's soft-target cross-entropy
    from timm.loss import SoftTargetCrossEntropy

    t = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    torch.testing.assert_close(ClassificationLoss()(logits, t), SoftTargetCrossEntropy()(logits, t))


def test_class_weights_inverse_and_effective_number():
    inv = class_weights([10, 30], "inverse")
    torch.testing.assert_close(inv, torch.tensor([1.5, 0.5]))
    beta = 0.9
    raw = np.array([(1 - beta) / (1 - beta ** 10), (1 - beta) / (1 - beta ** 30)])
    torch.testing.assert_close(class_weights([10, 30], "effective", beta),
                               torch.tensor(raw / raw.mean(), dtype=torch.float32))


def test_freeze_stages_of_coatnet():
    model = create_model("coatnet_tiny", num_classes=2, img_size=64)
    frozen = freeze_stages(model, 2)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("stages") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stages.2", "stages.3", "norm", "head"}  # the transformer stages, final norm, head
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    with pytest.raises(ModelError, match="has 4 stages"):
        freeze_stages(create_model("resnet18", num_classes=2, img_size=64), 5)


def test_augmentations_keep_shape_and_clahe_adds_contrast():
    torch.manual_seed(0)
    dull = 0.45 + 0.1 * torch.rand(1, 80, 80)
    out = Clahe(2.0)(dull)
    assert out.std() > 2 * dull.std()
    cfg = DataConfig(rrc_scale=0.5, brightness=0.2, contrast=0.2, clahe=True, auto_augment="randaugment",
                     random_erasing=1.0, rotate_degrees=10)
    tf = make_transform(48, [0.5] * 3, [0.5] * 3, train=True, cfg=cfg)
    x = tf(torch.rand(3, 70, 90))
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert (x == 0).any()  # random erasing (p=1) zeroes a rectangle of the normalized image


def test_mixup_cutmix_focal_and_frozen_run_end_to_end(tmp_path):
    data = write_class_folders(tmp_path / "images", n_per_class=16)
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", data) + [
        "train.mixup=0.4", "train.cutmix=1.0", "train.loss=focal", "train.label_smoothing=0.1",
        "model.freeze_stages=1", "train.class_weight_mode=effective", "train.sharpness_batches=1",
        "train.accum_steps=2", "data.clahe=true"])
    result = train(cfg, progress=False)
    assert np.isfinite(result.history[0]["train_loss"]) and (tmp_path / "run" / "best.pt").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_passes_a_synthetic_dry_run(recipe, capsys):
    # the dry run checks the recipe itself; a smaller input keeps the big backbones quick on CPU
    size = [] if "tiny_imagenet" in recipe.stem else ["--image-size", "64"]
    assert main(["train", "--config", str(recipe), "--dry-run", "--synthetic", *size]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run OK:") and "training steps" in out


def test_at_least_four_recipes_with_their_sources():
    assert len(RECIPES) >= 4
    for r in RECIPES:
        assert r.read_text().startswith("#"), f"{r.name} must say where it comes from"
        validate_config(load_config(r))


def test_bad_recipe_options():
    with pytest.raises(ConfigError, match="Did you mean 'focal_gamma'"):
        load_config(None, ["train.focal_gama=2"])
    with pytest.raises(ConfigError, match="train.loss"):
        validate_config(load_config(None, ["train.loss=hinge"]))
    with pytest.raises(ConfigError, match="auto_augment"):
        validate_config(load_config(None, ["data.auto_augment=augmix"]))
    assert main(["train", "--synthetic"]) == 2


def test_multistep_schedule_multiplies_at_milestones():
    from medsight.config import ScheduleConfig
    from medsight.optim import create_scheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_scheduler(opt, ScheduleConfig(name="multistep", milestones=[2, 3], gamma=0.1), 4, 5, 1.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[9] == 1.0 and lrs[10] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="milestones"):
        validate_config(load_config(None, ["schedule.name=multistep"]))


def test_cnn_transformer_adapter_trains_explains_and_reloads(tmp_path):
    from medsight.inference import Predictor
    from medsight.data.imageio import read_image

    data = write_class_folders(tmp_path / "images", n_per_class=12)
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", data) + [
        "model.name=cnn_transformer_resnet18", "optim.name=adamw", "optim.lr=1e-3", "train.sharpness_batches=1"])
    metrics = train(cfg, progress=False).metrics
    assert metrics["explain"]["target_layer"] == "proj"
    pred = Predictor(tmp_path / "run" / "best.pt", "cpu")
    img = read_image(sorted((data / "pneumonia").glob("*.png"))[0])
    assert abs(float(pred.probabilities(img).sum()) - 1) < 1e-5
    heat = pred.heatmap(img)
    assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1


def test_progressive_fine_tuning_phases(tmp_path, monkeypatch):
    import medsight.engine.loop as T

    seen = []
    real = T.train_step

    def spy(model, x, y, optimizer, loss_fn, grad_clip=0.0, opts=None):
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        lrs = sorted({round(g["lr"] / 1e-3, 6) for g in optimizer.param_groups})
        seen.append((frozenset(trainable), tuple(lrs)))
        return real(model, x, y, optimizer, loss_fn, grad_clip, opts)

    monkeypatch.setattr(T, "train_step", spy)
    data = write_class_folders(tmp_path / "images", n_per_class=12)
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", data, epochs=3) + [
        "model.name=resnet18", "optim.name=adamw", "optim.lr=1e-3", "schedule.name=none",
        "finetune.progressive=true", "finetune.lr_decay=0.5", "finetune.final_lr_scale=0.1"])
    result = train(cfg, progress=False)
    assert [r["phase"] for r in result.history] == [1, 2, 3]
    per_epoch = len(seen) // 3
    head, disc, final = seen[0], seen[per_epoch], seen[-1]
    assert head[0] == {"fc"} and head[1] == (1.0,)  # phase 1: the head alone
    assert "layer1" in disc[0] and disc[1] == (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0)  # 0.5^(depth from top)
    assert final[1] == (0.1,) and "conv1" in final[0]
    with pytest.raises(ConfigError, match="exceed"):
        validate_config(load_config(None, ["finetune.progressive=true", "finetune.head_epochs=3", "train.epochs=3"]))


BACKBONES = [("coatnet_0", 64), ("coatnet_1", 64), ("coatnet_2", 64), ("convnext_tiny", 64),
             ("swinv2_tiny_window8_256", 256), ("densenet121", 64), ("efficientnet_b2", 64), ("resnet18", 64),
             ("resnet50", 64), ("seresnext50_32x4d", 64), ("cnn_transformer_resnet18", 64)]


@pytest.mark.parametrize("name,size", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbone_smoke_dry_run(name, size):
    from medsight.engine import dry_run

    cfg = load_config(None, [f"model.name={name}", f"data.image_size={size}", "train.batch_size=2",
                             "data.num_classes=5", "optim.name=sam-adamw"])
    r = dry_run(cfg)
    assert r["classes"] == 5 and len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))


def test_rotation_pretext_run_gives_weights_for_fine_tuning(tmp_path):
    """A pretext run learns without labels; its best.pt starts a labelled run's backbone via model.weights."""
    from medsight.data import ROTATION_CLASSES
    from medsight.engine import build_model

    data = write_class_folders(tmp_path / "images", n_per_class=8)
    extra = ["data.pretext=rotation", "data.hflip=false", "train.sharpness_batches=0",
             "explain.faithfulness_images=0", "train.class_weights=false"]
    result = train(apply_overrides(Config(), tiny_overrides(tmp_path / "pre", data) + extra), progress=False)
    ckpt = torch.load(tmp_path / "pre" / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["classes"] == ROTATION_CLASSES
    from medsight.data import load_data

    assert result.history[0]["train_images"] == 4 * len(load_data(DataConfig(path=str(data))).splits["train"])
    fine = apply_overrides(Config(), tiny_overrides(tmp_path / "ft", data) + [f"model.weights={tmp_path / 'pre' / 'best.pt'}"])
    model, _ = build_model(fine, 2)
    state = model.state_dict()
    head = [k for k in ckpt["model"] if state[k].shape != ckpt["model"][k].shape]
    assert head and all(k.startswith("head") for k in head)  # 4 rotation classes -> 2 labels: a fresh head
    for k, v in ckpt["model"].items():
        if k not in head:
            assert torch.equal(state[k], v), k
