"""Many processes on CPU with Gloo: SAM under DistributedDataParallel, and `torchrun -m medsight train`."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medsight.config import OptimConfig
from medsight.optim import create_optimizer
from medsight.engine import StepOptions, train_step

from conftest import free_port, write_class_folders

STEPS = 3


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 2))


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)


def run_steps(model, optimizer, step_model, rank=0, world=1, sync=True):
    for s in range(STEPS):
        x, y = global_batch(s)
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        train_step(step_model, x[shard], y[shard], optimizer, nn.CrossEntropyLoss(),
                   opts=StepOptions(sync_first_pass=sync))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _worker(rank: int, world: int, port: int, sync: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.1))
        weights = run_steps(model, opt, ddp, rank, world, sync)
        torch.save(weights, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_weights(tmp_path, sync: bool) -> list[torch.Tensor]:
    mp.start_processes(_worker, args=(2, free_port(), sync, str(tmp_path)), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def single_process_weights() -> torch.Tensor:
    model = net()
    opt = create_optimizer(model, OptimConfig(name="sam-sgd", lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.1))
    return run_steps(model, opt, model)


def test_synced_sam_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    r0, r1 = ddp_weights(tmp_path, sync=True)
    assert torch.equal(r0, r1)  # replicas bit-identical
    torch.testing.assert_close(r0, single_process_weights(), rtol=1e-5, atol=1e-6)


def test_per_replica_sam_keeps_replicas_identical_but_differs_from_synced(tmp_path):
    r0, r1 = ddp_weights(tmp_path, sync=False)
    assert torch.equal(r0, r1)
    # m-sharpness: each replica's ascent direction comes from its own half batch, so the result differs
    assert not torch.allclose(r0, single_process_weights(), atol=1e-6)


def test_torchrun_trains_with_two_processes_and_only_rank_0_writes(tmp_path):
    data = write_class_folders(tmp_path / "data", n_per_class=16)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "medsight", "train", "--data", str(data), "--epochs", "2", "--image-size", "32",
           "--batch-size", "8", "--out", str(out), "--no-progress", "--set", "train.sharpness_batches=1",
           "--set", "explain.gallery_per_class=1", "--set", "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("epoch   1/2") == 1  # one epoch line: only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "sharpness" in metrics
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
    assert not list(out.glob("*.tmp*"))


def _dying_worker(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from medsight.engine.distributed import init_distributed

    init_distributed("cpu", timeout_s=20)
    if rank == 1:
        os._exit(3)  # a rank dies without a word
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1))
        q.put(("no error", time.time() - t0))
    except Exception as exc:  # noqa: BLE001 - the point is that an error surfaces
        q.put((type(exc).__name__ + ": " + str(exc).splitlines()[0], time.time() - t0))


def test_a_dead_rank_makes_the_others_fail_instead_of_hanging():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    message, seconds = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert message != "no error"
    assert seconds < 60
