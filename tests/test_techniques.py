"""The six research techniques added to the twelve: each against the check its paper implies, their bad input,
the ordinal default, and (slow) every head through train, evaluate, predict, explain, serve and export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from medsight.config import Config, ConfigError, apply_overrides, check_task_kind
from medsight.data import load_data
from medsight.data.sources import DataError
from medsight.losses import (CenterLoss, EmbeddingLoss, EvidentialLoss, batch_hard_triplet, dirichlet_kl_to_uniform,
                             prototypical_loss)
from medsight.models import EmbeddingTap, ManifoldMixup, install_head, set_prototypes
from medsight.models.heads import (CosineClassifier, PrototypeClassifier, evidential_alpha, evidential_probabilities,
                                   evidential_uncertainty)
from medsight.tasks import SingleLabelTask, build_task, task_from_state
from medsight.techniques import TECHNIQUES

from conftest import blob_image, tiny_overrides, write_class_folders


def tiny(name: str = "test_resnet", k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=k)


def blobs(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.stack([blob_image(int(c), rng, size) for c in y]).astype(np.float32) / 255
    return torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1), torch.from_numpy(y).long()


# ------------------------------------------------------------------------------------------- cosine head

@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
@pytest.mark.parametrize("learn", [True, False])
def test_cosine_logits_are_bounded_by_the_scale(name, learn):
    model = install_head(tiny(name, 3), "cosine", 3, scale=5.0, learn_scale=learn).eval()
    head = model.get_classifier()
    assert isinstance(head, CosineClassifier) and head.log_scale.requires_grad == learn
    x = torch.randn(6, 3, 32, 32) * 50  # large inputs: a linear head's logits would grow with them
    logits = model(x)
    assert logits.shape == (6, 3)
    assert logits.abs().max() <= 5.0 + 1e-4
    with torch.no_grad():
        head.log_scale.fill_(math.log(2.0))
    assert model(x).abs().max() <= 2.0 + 1e-4
    # the logits are the cosine times the scale: normalized feature against normalized class weights
    with EmbeddingTap(model) as tap:
        out = model(x)
        f = tap.take()
    cos = nn.functional.normalize(f, dim=1) @ nn.functional.normalize(head.weight, dim=1).T
    assert torch.allclose(out, 2.0 * cos, atol=1e-5)


# -------------------------------------------------------------------------------------- evidential head

def test_evidential_probabilities_and_uncertainty_follow_the_dirichlet():
    z = torch.tensor([[0.0, 0.0, 0.0], [4.0, 1.0, 1.0], [-3.0, 7.0, 2.0]])
    alpha = evidential_alpha(z)
    assert torch.all(alpha >= 1) and torch.allclose(alpha.min(1).values, torch.ones(3))
    p = evidential_probabilities(z)
    assert torch.allclose(p.sum(1), torch.ones(3))
    u = evidential_uncertainty(p)
    assert torch.allclose(u, 3 / alpha.sum(1))  # u = K / S, read back from the probabilities
    assert u[0] == pytest.approx(1.0)  # no evidence: total uncertainty
    assert torch.all((u >= 0) & (u <= 1)) and u[2] < u[1] < u[0]


def test_evidential_task_confidence_is_one_minus_u_and_feeds_abstention():
    task = SingleLabelTask(["a", "b", "c"], options={"head": "evidential"})
    assert not task.head.calibratable
    p = evidential_probabilities(torch.tensor([[6.0, 0.0, 0.0], [0.5, 0.0, 0.2]])).numpy()
    u = evidential_uncertainty(torch.from_numpy(p)).numpy()
    assert np.allclose(task.readout.confidence(p), 1 - u)
    task.rules.abstain_below = float(np.mean(1 - u))
    sure, unsure = task.readout.answer(p[0]), task.readout.answer(p[1])
    assert sure["refer_to_clinician"] is False and unsure["refer_to_clinician"] is True
    assert unsure["uncertainty"] == pytest.approx(u[1], abs=1e-6)
    assert task_from_state(task.state()).evidential  # the checkpoint keeps the head


def test_evidential_kl_term_is_annealed_and_zero_only_for_the_uniform_dirichlet():
    assert dirichlet_kl_to_uniform(torch.ones(1, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert dirichlet_kl_to_uniform(torch.tensor([[1.0, 5.0]])).item() > 0
    loss = EvidentialLoss(2, anneal_epochs=4)
    z, y = torch.tensor([[3.0, 0.0]]), torch.tensor([1])  # evidence for the wrong class
    loss.set_epoch(0)
    early = loss(z, y).item()
    loss.set_epoch(2)
    assert loss.kl_weight.item() == pytest.approx(0.5)
    loss.set_epoch(9)
    assert loss.kl_weight.item() == 1.0 and loss(z, y).item() > early
    # evidence on the true class only is not penalized: the KL term reads α with the target's entry removed
    right = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    loss.set_epoch(0)
    no_kl = loss(*right).item()
    loss.set_epoch(9)
    assert loss(*right).item() == pytest.approx(no_kl, abs=1e-6)


def test_evidential_strength_falls_on_out_of_distribution_images():
    torch.manual_seed(0)
    model = tiny()
    x, y = blobs(64)
    loss_fn = EvidentialLoss(2, anneal_epochs=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(4):
        loss_fn.set_epoch(epoch)
        for i in range(0, 64, 16):
            opt.zero_grad()
            loss_fn(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        s_in = evidential_alpha(model(blobs(32, seed=5)[0])).sum(1)
        ood = torch.rand(32, 3, 32, 32)  # bright uniform noise: neither class's texture
        s_out = evidential_alpha(model(ood)).sum(1)
        u_out = evidential_uncertainty(evidential_probabilities(model(ood)))
    assert s_in.mean() > 2 * s_out.mean()
    assert torch.all((u_out >= 0) & (u_out <= 1))


# ----------------------------------------------------------------------------------------- prototypes

def test_prototypes_are_class_means_and_ignore_the_order_of_the_support_images():
    model = install_head(tiny(), "prototypical", 2)
    assert isinstance(model.get_classifier(), PrototypeClassifier)
    x, y = blobs(10)
    query = blobs(6, seed=3)[0]
    set_prototypes(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    first = model.eval()(query).detach()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    set_prototypes(model, [(x[perm][:3], y[perm][:3]), (x[perm][3:], y[perm][3:])])
    assert torch.allclose(model(query), first, atol=1e-4)
    with EmbeddingTap(model) as tap:
        model(x)
        f = tap.take()
    assert torch.allclose(model.get_classifier().prototypes[1], f[y == 1].mean(0), atol=1e-4)
    # the answer is the nearest prototype: −squared distance
    with EmbeddingTap(model) as tap:
        logits = model(query)
        fq = tap.take()
    d = torch.cdist(fq, model.get_classifier().prototypes) ** 2
    assert torch.allclose(logits, -d, atol=1e-3)


def test_prototypical_loss_rewards_separated_classes():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    apart = torch.cat([torch.zeros(4, 3), torch.full((4, 3), 5.0)]) + 0.01 * torch.randn(8, 3)
    mixed = torch.randn(8, 3)
    g = torch.Generator().manual_seed(0)
    assert prototypical_loss(apart, y, g) < 0.01 < prototypical_loss(mixed, y, g)
    single = prototypical_loss(torch.randn(2, 3, requires_grad=True), torch.tensor([0, 1]))
    assert single.item() == 0 and single.requires_grad  # no query in the episode: no signal, still a graph


# ----------------------------------------------------------------------------------- embedding losses

def test_center_loss_pulls_features_toward_their_class_centre():
    torch.manual_seed(0)
    y = torch.arange(40) % 4
    f = nn.Parameter(torch.randn(40, 8) * 3)
    loss_fn = CenterLoss(4, alpha=0.5)
    opt = torch.optim.SGD([f], lr=10.0)  # the loss is a mean over 40 images

    def spread() -> float:
        return float(sum(((f[y == c] - f[y == c].mean(0)) ** 2).sum() for c in range(4)).detach())

    before, first = spread(), loss_fn(f, y).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(f, y).backward()
        opt.step()
    assert spread() < 0.2 * before and loss_fn(f, y).item() < first
    for c in range(4):  # the centres moved to their class's features (Wen et al.'s update)
        assert torch.allclose(loss_fn.centers[c], f[y == c].mean(0).detach(), atol=0.5)


def test_batch_hard_triplet_uses_the_hardest_pairs():
    y = torch.tensor([0, 0, 1, 1])
    far = torch.tensor([[1.0, 0], [1.0, 0.01], [-1.0, 0], [-1.0, 0.01]])
    assert batch_hard_triplet(far, y, margin=0.2).item() == pytest.approx(0.0)
    # two negatives at different distances from anchor 0: the nearer one is the hard one
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.995, 0.0998], [-1.0, 0.0]])
    zn = nn.functional.normalize(z, dim=1)
    d = [[float((zn[i] - zn[j]).norm()) for j in range(4)] for i in range(4)]
    expected = []
    for a in range(4):
        pos = [d[a][j] for j in range(4) if j != a and y[j] == y[a]]
        neg = [d[a][j] for j in range(4) if y[j] != y[a]]
        expected.append(max(0.0, max(pos) - min(neg) + 0.3))
    assert batch_hard_triplet(z, y, margin=0.3).item() == pytest.approx(sum(expected) / 4, abs=1e-4)
    assert batch_hard_triplet(far, torch.zeros(4, dtype=torch.long)).item() == 0  # one class: no negatives


def test_embedding_loss_adds_the_weighted_terms_to_the_task_loss():
    model = tiny()
    x, y = blobs(8)
    tap = EmbeddingTap(model)
    base = nn.CrossEntropyLoss()
    plain = base(model(x), y)
    with_aux = EmbeddingLoss(base, tap, 2, triplet_weight=0.5, center_weight=0.1)(model(x), y)
    f = tap.features if tap.features is not None else None
    assert f is None  # taken by the loss
    model(x)
    emb = tap.take()
    expected = plain + 0.5 * batch_hard_triplet(emb, y) + 0.1 * 0.5 * (emb ** 2).sum(1).mean()  # centres start at 0
    assert with_aux.item() == pytest.approx(expected.item(), rel=1e-4)
    tap.close()


# ------------------------------------------------------------------------------------- manifold mixup

def test_manifold_mixup_mixes_a_hidden_layer_and_the_labels_by_the_same_lambda():
    model = tiny("test_resnet", 3).train()
    seen = {}
    # registered before the mixer's hook: sees layer1's own output; layer2's pre-hook sees what it receives
    model.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.detach()))
    model.layer2.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0].detach()))
    mixer = ManifoldMixup(model, alpha=1.0, num_classes=3, seed=0)
    assert mixer.layers[0] == "" and "layer1" in mixer.layers and "layer4" not in mixer.layers
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    x_out, target = mixer(x, y, layer="layer1")
    assert x_out is x  # the input itself is untouched when a hidden layer mixes
    lam = mixer.lam
    assert 0 < lam < 1
    model(x_out)
    h = seen["h"]
    assert torch.allclose(seen["in"], lam * h + (1 - lam) * h.flip(0), atol=1e-5)
    onehot = nn.functional.one_hot(y, 3).float()
    assert torch.allclose(target, lam * onehot + (1 - lam) * onehot.flip(0))
    model.eval()  # never in evaluation
    with torch.no_grad():
        model(x)
    assert torch.allclose(seen["in"], seen["h"])
    x_in, _ = mixer(x, y, layer="")
    assert torch.allclose(x_in, mixer.lam * x + (1 - mixer.lam) * x.flip(0))
    mixer.close()


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("setting, key", [
    ("train.triplet_weight=-0.1", "train.triplet_weight"), ("train.center_weight=.nan", "train.center_weight"),
    ("train.center_weight=.inf", "train.center_weight"), ("train.manifold_mixup=-1", "train.manifold_mixup")])
def test_loss_weights_must_be_finite_and_not_negative(setting, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(Config(), [setting])


@pytest.mark.parametrize("settings, key", [
    (["data.task=ordinal", "train.head=evidential"], "train.head=evidential"),
    (["data.task=multilabel", "train.head=prototypical"], "train.head=prototypical"),
    (["data.task=multilabel", "train.center_weight=0.1"], "train.center_weight"),
    (["train.center_weight=0.1", "train.batch_size=1"], "train.center_weight"),
    (["train.triplet_weight=0.1", "train.batch_size=1"], "train.triplet_weight"),
    (["train.manifold_mixup=1", "train.mixup=0.2"], "train.manifold_mixup"),
    (["data.task=ordinal", "train.ordinal=corn", "train.manifold_mixup=1"], "train.manifold_mixup"),
    (["train.head=prototypical", "data.shots=1"], "data.shots"),
    (["train.head=prototypical", "finetune.progressive=true", "train.epochs=4"], "train.head=prototypical")])
def test_techniques_that_do_not_fit_are_refused_naming_the_option(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), settings)


def test_a_technique_is_checked_against_the_kind_read_from_the_data():
    cfg = apply_overrides(Config(), ["train.triplet_weight=0.1"])  # data.task=auto: fine until the data says
    check_task_kind(cfg, "single_label")
    with pytest.raises(ConfigError, match="train.triplet_weight"):
        check_task_kind(cfg, "multilabel")


def test_shots_larger_than_the_smallest_class_names_the_option(small_npz):
    cfg = apply_overrides(Config(), [f"data.path={small_npz}", "data.shots=21"])  # 20 images per class
    with pytest.raises(DataError, match="--shots 21.*smallest class"):
        load_data(cfg.data)
    bundle = load_data(apply_overrides(cfg, ["data.shots=5"]).data)
    assert np.bincount(bundle.splits["train"].labels).tolist() == [5, 5]
    assert len(bundle.splits["test"]) == 12  # the test split is left whole


def test_bad_technique_input_stops_training_before_it_starts(tmp_path, small_npz):
    from medsight.engine import train

    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", small_npz) + ["data.shots=50"])
    with pytest.raises(DataError, match="data.shots"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


# ---------------------------------------------------------------------------------------- the recipe

def test_graded_labels_alone_get_the_corn_head_and_the_user_still_wins():
    from medsight.planning.fingerprint import Fingerprint
    from medsight.planning.planner import make_plan

    fp = Fingerprint(source="grades.npz", task="ordinal", classes=[str(i) for i in range(5)],
                     counts={"val": [1] * 5}, n_train=1080, image_side=28, aspect=1.0, channels=3, mixed=False,
                     imbalance=7.0, sampled=1080)
    chosen = {d.key: d.value for d in make_plan(fp, apply_overrides(Config(), ["data.task=ordinal"])).decisions}
    assert chosen["train.ordinal"] == "corn"
    kept = make_plan(fp, apply_overrides(Config(), ["data.task=ordinal", "train.ordinal=ce"]))
    assert "train.ordinal" not in {d.key for d in kept.decisions}
    mixed = make_plan(fp, apply_overrides(Config(), ["data.task=ordinal", "train.mixup=0.2"]))
    assert {d.key: d.value for d in mixed.decisions}["train.ordinal"] == "smooth"  # CORN takes no mixed grades
    single = make_plan(Fingerprint(**{**fp.__dict__, "task": "single_label"}), Config())
    assert "train.ordinal" not in {d.key for d in single.decisions}


def test_train_help_lists_the_twelve_techniques(capsys):
    from medsight.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert len(TECHNIQUES) == 12 and "--shots" in text
    for t in TECHNIQUES:
        assert t.name in text and all(s in text for s in t.settings)


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.parametrize("settings", [["train.head=evidential"], ["train.head=cosine"],
                                      ["train.head=prototypical", "data.shots=8"],
                                      ["train.triplet_weight=0.1", "train.center_weight=0.01"],
                                      ["train.manifold_mixup=2.0"]], ids=lambda s: s[0].split("=")[0])
def test_each_technique_trains_evaluates_predicts_explains_serves_and_exports(tmp_path, settings):
    from fastapi.testclient import TestClient

    from medsight.cli import main
    from medsight.serve.app import create_app

    data = write_class_folders(tmp_path / "images", n_per_class=12)
    out = tmp_path / "run"
    overrides = tiny_overrides(out, data) + ["model.name=test_resnet", "train.sharpness_batches=1",
                                             "explain.faithfulness_images=0", *settings]
    assert main(["train", "--no-progress", *sum((["--set", s] for s in overrides), [])]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test"]["accuracy"] <= 1 and "selective" in json.dumps(m)
    assert main(["evaluate", str(out / "best.pt"), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    img = next((data / "pneumonia").iterdir())
    assert main(["explain", str(out / "best.pt"), str(img), "--out", str(tmp_path / "cam")]) == 0
    assert any((tmp_path / "cam").iterdir())
    assert main(["export", str(out / "best.pt"), "--out", str(tmp_path / "m.onnx")]) == 0
    from medsight.inference.onnx import OnnxPredictor
    from medsight.inference.predictor import Predictor
    from medsight.data.imageio import read_image

    torch_answer = Predictor(out / "best.pt").predict(read_image(img))
    onnx_answer = OnnxPredictor(tmp_path / "m.onnx").predict(read_image(img))
    assert onnx_answer["label"] == torch_answer["label"]
    assert onnx_answer["probability"] == pytest.approx(torch_answer["probability"], abs=1e-3)
    if settings == ["train.head=evidential"]:
        assert 0 <= torch_answer["uncertainty"] <= 1 and "refer_to_clinician" in torch_answer
    client = TestClient(create_app(str(out / "best.pt")))
    r = client.post("/predict", files={"file": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["label"] == torch_answer["label"]
