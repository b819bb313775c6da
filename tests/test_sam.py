import io

import pytest
import torch
from torch import nn

from medsight.config import OptimConfig
from medsight.optim import SAM, create_optimizer
from medsight.engine import train_step

A = torch.tensor([1.0, 3.0, 0.5])


def quad_loss(w):
    return 0.5 * (A * w * w).sum()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_hand_computed_update(adaptive):
    w0 = torch.tensor([1.0, -2.0, 0.5])
    w = nn.Parameter(w0.clone())
    lr, rho = 0.1, 0.05
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    quad_loss(w).backward()
    opt.first_step(zero_grad=True)
    quad_loss(w).backward()
    opt.second_step(zero_grad=True)

    g = A * w0
    if adaptive:  # ASAM: e = rho * w^2 g / ||w g||
        e = rho * w0 * w0 * g / torch.linalg.norm(w0 * g)
    else:  # SAM: e = rho g / ||g||
        e = rho * g / torch.linalg.norm(g)
    expected = w0 - lr * A * (w0 + e)
    torch.testing.assert_close(w.detach(), expected)


def test_step_with_closure_equals_two_step_form():
    w1 = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    w2 = nn.Parameter(w1.detach().clone())
    o1 = SAM([w1], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    o2 = SAM([w2], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(3):
        quad_loss(w1).backward()
        o1.step(lambda: quad_loss(w1).backward())
        o1.zero_grad()
        quad_loss(w2).backward()
        o2.first_step(zero_grad=True)
        quad_loss(w2).backward()
        o2.second_step(zero_grad=True)
    torch.testing.assert_close(w1.detach(), w2.detach())


def test_state_dict_round_trip_keeps_base_optimizer_state():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, momentum=0.9, rho=0.05))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    loss_fn = nn.CrossEntropyLoss()
    train_step(model, x, y, opt, loss_fn)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through bytes, as in a checkpoint
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert any("momentum_buffer" in s for s in sd["state"].values())  # the base optimizer's state is in it

    clone = nn.Linear(4, 2)
    clone.load_state_dict(model.state_dict())
    opt2 = create_optimizer(clone, OptimConfig(name="sam-sgd", lr=0.1, momentum=0.9, rho=0.05))
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    train_step(model, x, y, opt, loss_fn)
    train_step(clone, x, y, opt2, loss_fn)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b)


def test_rho_must_be_positive():
    with pytest.raises(ValueError, match="rho must be > 0"):
        SAM([nn.Parameter(torch.zeros(2))], torch.optim.SGD, rho=0.0, lr=0.1)


def test_adaptive_with_odd_rho_warns():
    with pytest.warns(UserWarning, match="adaptive SAM"):
        SAM([nn.Parameter(torch.zeros(2))], torch.optim.SGD, rho=50.0, adaptive=True, lr=0.1)


def test_batchnorm_statistics_update_once_per_sam_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4, momentum=0.1), nn.Linear(4, 2))
    opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, rho=0.5))
    x = torch.randn(16, 4) * 3 + 2
    y = torch.randint(0, 2, (16,))
    train_step(model, x, y, opt, nn.CrossEntropyLoss())
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))  # one update, not two
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.momentum, 0.1)  # restored after the second pass


def test_sam_differs_from_plain_step():
    torch.manual_seed(0)
    m1 = nn.Linear(4, 2)
    m2 = nn.Linear(4, 2)
    m2.load_state_dict(m1.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    train_step(m1, x, y, create_optimizer(m1, OptimConfig(name="sgd", lr=0.5, weight_decay=0)), nn.CrossEntropyLoss())
    train_step(m2, x, y, create_optimizer(m2, OptimConfig(name="sam-sgd", lr=0.5, weight_decay=0, rho=0.5)),
               nn.CrossEntropyLoss())
    assert not torch.allclose(m1.weight, m2.weight)
