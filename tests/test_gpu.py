"""GPU paths: bf16 SAM with fused AdamW and channels_last, compiled CoAtNet training, NCCL-free single GPU.

Run with `pytest -m gpu` on a machine with a CUDA GPU; the default run leaves them out. Without a GPU
they fail rather than skip, so a GPU job that silently lost its GPU cannot pass.
"""

import pytest
import torch
from torch import nn

from medsight.config import Config, OptimConfig, apply_overrides
from medsight.models import create_model
from medsight.optim import create_optimizer
from medsight.engine import StepOptions, train, train_step

from conftest import tiny_overrides

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA GPU (torch.cuda.is_available() is False)")


def _coatnet_steps(precision: str, steps: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model("coatnet_tiny", num_classes=2, img_size=64).cuda().to(memory_format=torch.channels_last)
    opt = create_optimizer(model, OptimConfig(name="sam-adamw", lr=1e-3, rho=0.05), fused=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 3, 64, 64, generator=g).cuda().contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (32,), generator=g).cuda()
        train_step(model, x, y, opt, nn.CrossEntropyLoss(), opts=StepOptions(precision=precision))
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()


def test_bf16_sam_with_fused_adamw_lands_near_fp32():
    torch.manual_seed(0)  # the same initial weights as _coatnet_steps
    start = torch.cat([p.detach().flatten() for p in create_model("coatnet_tiny", num_classes=2,
                                                                   img_size=64).parameters()])
    ref, bf16 = _coatnet_steps("fp32"), _coatnet_steps("bf16")
    moved = (ref - start).norm()
    assert moved > 0
    assert (bf16 - ref).norm() < 0.1 * moved


def test_compiled_bf16_training_on_gpu_matches_eager(tmp_path, small_npz):
    losses = {}
    for compiled in (False, True):
        cfg = apply_overrides(Config(), tiny_overrides(tmp_path / str(compiled), small_npz) + [
            "train.device=cuda", "train.precision=bf16", f"train.compile={str(compiled).lower()}",
            "train.sharpness_batches=0", "explain.gallery_per_class=0", "explain.faithfulness_images=0"])
        losses[compiled] = [row["train_loss"] for row in train(cfg, progress=False).history]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)  # bf16 kernels differ after fusion
