"""SAM at scale: mixed precision, BatchNorm passes, gradient accumulation, LookSAM, sharpness, config checks."""

import copy
import warnings

import pytest
import torch
from torch import nn

from medsight.config import ConfigError, OptimConfig, load_config, validate_config
from medsight.optim import LookSAM, create_optimizer
from medsight.evaluation.sharpness import sharpness
from medsight.engine import StepOptions, train_step


def small_net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def run_steps(model, name="sam-sgd", steps=4, opts=None, lr=0.05, **optim_kw):
    opt = create_optimizer(model, OptimConfig(name=name, lr=lr, weight_decay=0.0, momentum=0.9, rho=0.05,
                                              **optim_kw))
    for s in range(steps):
        x, y = batch(seed=s)
        train_step(model, x, y, opt, nn.CrossEntropyLoss(), opts=opts)
    return opt


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_sam_lands_near_fp32(precision):
    ref, amp = small_net(), small_net()
    run_steps(ref)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    run_steps(amp, opts=StepOptions(precision=precision, scaler=scaler))
    moved = (flat(ref) - flat(small_net())).norm()
    gap = (flat(amp) - flat(ref)).norm()
    assert moved > 0.05  # the steps did something ...
    assert gap < 0.05 * moved, f"{precision} drifted {gap:.4g} from fp32 (steps moved {moved:.4g})"
    if scaler is not None:
        assert scaler.get_scale() == 65536.0  # no overflow: the scale was left alone (updated once per step)


def test_fp16_overflow_skips_both_passes_and_backs_off_once():
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # the scaled loss overflows fp16
    opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, momentum=0.9, weight_decay=0.0))
    x, y = batch()
    train_step(model, x, y, opt, nn.CrossEntropyLoss(), opts=StepOptions(precision="fp16", scaler=scaler))
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert scaler.get_scale() == 2.0 ** 99  # backed off exactly once
    assert not opt.base_optimizer.state  # no momentum buffer: the base optimizer never stepped
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode,expected", [("first", 1), ("both", 2)])
def test_batchnorm_statistics_update_per_step(mode, expected):
    model = small_net()
    bn = model[1]
    x, y = batch()
    opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, weight_decay=0.0))
    probe = copy.deepcopy(model)
    probe.train()
    with torch.no_grad():
        probe(x)  # one forward at the unperturbed weights: what "first pass only" must leave behind
    train_step(model, x, y, opt, nn.CrossEntropyLoss(), opts=StepOptions(sam_bn=mode))
    assert int(bn.num_batches_tracked) == expected
    if mode == "first":
        torch.testing.assert_close(bn.running_mean, probe[1].running_mean)
        torch.testing.assert_close(bn.running_var, probe[1].running_var)
    else:
        assert not torch.allclose(bn.running_mean, probe[1].running_mean)


@pytest.mark.parametrize("name", ["sam-sgd", "sgd"])
def test_gradient_accumulation_equals_the_full_batch(name):
    full, accum = small_net(bn=False), small_net(bn=False)
    run_steps(full, name=name, steps=3)
    run_steps(accum, name=name, steps=3, opts=StepOptions(accum_steps=4))
    torch.testing.assert_close(flat(accum), flat(full), rtol=1e-4, atol=1e-5)


def test_gradient_clipping_composes_with_sam():
    clipped, free = small_net(bn=False), small_net(bn=False)
    run_steps(clipped, name="sam-sgd", steps=1, opts=StepOptions(grad_clip=1e-3), lr=1.0)
    run_steps(free, name="sam-sgd", steps=1, lr=1.0)
    start = flat(small_net(bn=False))
    # plain SGD, one step from zero momentum: the update is lr * clipped gradient, norm <= 1e-3
    assert (flat(clipped) - start).norm() <= 1e-3 + 1e-6
    assert (flat(free) - start).norm() > 1e-2


def test_looksam_runs_the_second_pass_every_k_steps():
    model = small_net(bn=False)
    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    opt = create_optimizer(model, OptimConfig(name="looksam-sgd", lr=0.05, weight_decay=0.0, looksam_k=3))
    assert isinstance(opt, LookSAM)
    passes = []
    for s in range(7):
        x, y = batch(seed=s)
        before = calls["n"]
        train_step(model, x, y, opt, nn.CrossEntropyLoss())
        passes.append(calls["n"] - before)
    assert passes == [2, 1, 1, 2, 1, 1, 2]


def test_looksam_refresh_step_is_a_sam_step_and_reuse_adds_the_orthogonal_part():
    sam_model, look_model = small_net(bn=False), small_net(bn=False)
    sam_opt = run_steps(sam_model, name="sam-sgd", steps=1)
    look_opt = run_steps(look_model, name="looksam-sgd", steps=1)
    torch.testing.assert_close(flat(look_model), flat(sam_model))  # step 0 refreshes: exactly SAM
    plain_model = small_net(bn=False)
    run_steps(plain_model, name="sgd", steps=1)
    assert not torch.allclose(flat(plain_model), flat(sam_model), atol=1e-6)  # ... which is not a plain step
    assert sam_opt.param_groups[0]["rho"] == 0.05
    # g_v is orthogonal to the plain gradient it was computed against
    x, y = batch(seed=0)
    ref = small_net(bn=False)
    nn.CrossEntropyLoss()(ref(x), y).backward()
    g = torch.cat([p.grad.flatten() for p in ref.parameters()])
    gv = torch.cat([look_opt.g_v[p].flatten() for p in look_model.parameters()])
    assert abs(float(g @ gv)) < 1e-4 * float(g.norm() * gv.norm())
    assert gv.norm() > 0
    # state_dict round trip keeps the step counter and g_v
    clone = small_net(bn=False)
    opt2 = create_optimizer(clone, OptimConfig(name="looksam-sgd", lr=0.05, weight_decay=0.0))
    opt2.load_state_dict(look_opt.state_dict())
    assert opt2.steps == 1 and not opt2.needs_second_pass()
    torch.testing.assert_close(torch.cat([opt2.g_v[p].flatten() for p in clone.parameters()]), gv)


def test_looksam_with_alpha_zero_reuse_is_the_plain_step():
    plain, look = small_net(bn=False), small_net(bn=False)
    lo = create_optimizer(look, OptimConfig(name="looksam-sgd", lr=0.05, weight_decay=0.0, looksam_alpha=0.0))
    po = create_optimizer(plain, OptimConfig(name="sgd", lr=0.05, weight_decay=0.0))
    x, y = batch(seed=0)
    train_step(look, x, y, lo, nn.CrossEntropyLoss())  # refresh (SAM) step
    plain.load_state_dict(look.state_dict())
    po.load_state_dict(copy.deepcopy(lo.base_optimizer.state_dict()))  # no shared momentum buffers
    x, y = batch(seed=1)
    train_step(look, x, y, lo, nn.CrossEntropyLoss())
    train_step(plain, x, y, po, nn.CrossEntropyLoss())
    torch.testing.assert_close(flat(look), flat(plain))


def test_sharpness_of_a_quadratic_matches_the_closed_form():
    # L(w) = mean((x.w)^2) = w^T A w with A = X^T X / n. With w along A's top eigenvector v (eigenvalue
    # lam), the worst point of the rho-ball is w + rho v and the rise is lam (2 |w| rho + rho^2).
    torch.manual_seed(0)
    X = torch.randn(64, 5)
    A = X.T @ X / 64
    lam, vecs = torch.linalg.eigh(A)
    model = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.3 * vecs[:, -1][None])
    before = model.weight.detach().clone()
    rho = 0.1
    result = sharpness(model, [(X, torch.zeros(64))], rho=rho, loss_fn=lambda out, y: (out[:, 0] ** 2).mean())
    expected = float(lam[-1] * (2 * 0.3 * rho + rho ** 2))
    assert result["ascent"] == pytest.approx(expected, rel=1e-3)
    assert result["random"] < result["ascent"]
    torch.testing.assert_close(model.weight, before, rtol=0, atol=0)  # weights restored
    bigger = sharpness(model, [(X, torch.zeros(64))], rho=2 * rho, loss_fn=lambda out, y: (out[:, 0] ** 2).mean())
    assert bigger["ascent"] > result["ascent"]


def test_sharpness_rejects_bad_rho():
    with pytest.raises(ValueError, match="rho"):
        sharpness(nn.Linear(2, 2), [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], rho=0)


@pytest.mark.parametrize("sets,match", [
    (["optim.name=looksam-adamw", "optim.rho=0"], "rho must be > 0"),
    (["optim.name=sam-adamx"], r"Did you mean .*'sam-adamw'"),
    (["optim.sam_bn=second"], "sam_bn"),
    (["train.precision=fp8"], "precision"),
    (["train.accum_steps=0"], "accum_steps"),
    (["optim.looksam_k=0"], "looksam_k"),
])
def test_bad_scale_options_are_rejected(sets, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(load_config(None, sets))


def test_questionable_options_warn():
    with pytest.warns(UserWarning, match="adaptive SAM"):
        validate_config(load_config(None, ["optim.adaptive=true", "optim.rho=50"]))
    with pytest.warns(UserWarning, match="grad_scaler is only for fp16"):
        validate_config(load_config(None, ["train.precision=bf16", "train.grad_scaler=true"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(load_config(None, ["train.precision=fp16"]))


@pytest.mark.parametrize("layerwise", [True, False])
def test_looksam_reuse_step_by_hand(layerwise):
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    opt = LookSAM([a, b], torch.optim.SGD, lr=1.0, k=5, alpha=0.5, layerwise=layerwise)
    opt.g_v = {a: torch.tensor([0.0, 4.0]), b: torch.tensor([-2.0])}
    opt.steps = 1
    ga, gb = torch.tensor([3.0, 4.0]), torch.tensor([1.0])
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.reuse_step()
    if layerwise:  # per tensor: alpha * |g_l| / |v_l| * v_l
        ea = ga + 0.5 * 5.0 / 4.0 * torch.tensor([0.0, 4.0])
        eb = gb + 0.5 * 1.0 / 2.0 * torch.tensor([-2.0])
    else:  # whole model: alpha * |g| / |v| * v
        s = 0.5 * (26 ** 0.5) / (20 ** 0.5)
        ea, eb = ga + s * torch.tensor([0.0, 4.0]), gb + s * torch.tensor([-2.0])
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, 2.0]) - ea)
    torch.testing.assert_close(b.detach(), torch.tensor([3.0]) - eb)
    assert opt.steps == 2


def test_prepare_compile_turns_fused_attention_off_in_built_coatnet():
    from medsight.models import create_model, prepare_compile

    model = create_model("coatnet_tiny", num_classes=2, img_size=32)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    assert fused, "timm builds CoAtNet's attention fused by default on this torch"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert prepare_compile(model) == len(fused)
        after = model(x)
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # same function, unfused kernels


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, small_npz):
    """train.compile=true (inductor, CPU here) trains CoAtNet + SAM to the same losses as eager mode."""
    from medsight.config import Config, apply_overrides
    from medsight.engine import train
    from conftest import tiny_overrides

    losses = {}
    for compiled in (False, True):
        cfg = apply_overrides(Config(), tiny_overrides(tmp_path / str(compiled), small_npz) + [
            f"train.compile={str(compiled).lower()}", "train.sharpness_batches=0", "explain.gallery_per_class=0",
            "explain.faithfulness_images=0"])
        result = train(cfg, progress=False)
        losses[compiled] = [row["train_loss"] for row in result.history]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
