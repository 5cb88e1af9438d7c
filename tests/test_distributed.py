"""DDP on 2 CPU processes (gloo): ranks stay identical, match one process on the whole batch, and torchrun works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hwaware.data import build_loader
from hwaware.evaluation import load_supernet
from hwaware.space import get_space
from hwaware.train import SupernetTrainer, make_config

pytestmark = pytest.mark.distributed
DIGITS = get_space("digits")
CONFIG = dict(strategy="sandwich", num_random=2, warmup_epochs=0, threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(build_loader("digits", DIGITS, "train", 32, rank=0, world_size=1)))


def _train_rank(rank: int, port: int, steps: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        trainer = SupernetTrainer(make_config(**CONFIG), DIGITS, steps_per_epoch=10, rank=rank, world_size=2)
        images, labels = _batch()
        half = slice(rank * 16, rank * 16 + 16)  # each rank its own half of the batch
        for _ in range(steps):
            trainer.train_step(images[half], labels[half])
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(gathered, result_path)
    finally:
        dist.destroy_process_group()


def test_ranks_stay_identical_and_match_one_process(tmp_path):
    steps = 3
    result_path = tmp_path / "params.pt"
    mp.start_processes(_train_rank, args=(_free_port(), steps, str(result_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = torch.load(result_path, weights_only=True)
    # Different data on each rank, deeper blocks unused by some subnets: still bit-identical ranks.
    assert torch.equal(rank0, rank1)

    torch.manual_seed(0)
    single = SupernetTrainer(make_config(**CONFIG), DIGITS, steps_per_epoch=10)
    images, labels = _batch()
    for _ in range(steps):
        single.train_step(images, labels)
    flat = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    # Equal up to float summation order, which Adam magnifies on parameters whose gradients are ~0;
    # without the all-reduce, parameters would differ by ~lr (2e-3) almost everywhere.
    difference = (rank0 - flat).abs()
    assert float(difference.max()) < 1e-3 and float(difference.mean()) < 1e-6, (difference.max(), difference.mean())


@pytest.mark.slow  # ~25 s: two fresh interpreters importing torch; the spawn test above covers the DDP maths
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "hwaware.cli", "train", "--space", "digits", "--data", "digits", "--out", str(out),
               "--epochs", "1", "--batch-size", "128", "--threads", "1", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("val top-1 largest") == 1  # one summary, from rank 0
    _, meta = load_supernet(out / "last.pt")
    assert meta["complete"] and meta["step"] == 1257 // 2 // 128  # 629 images per rank, 4 full batches
    assert len(meta["history"]) == 1 and 0 <= meta["history"][0]["val_top1_largest"] <= 1
