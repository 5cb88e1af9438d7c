"""DDP on 2 CPU processes (gloo): ranks stay identical, match one process on the whole batch, and torchrun works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


# ---- rank 0 is the truth: sharing its state, stopping every rank on one rank's error (issue 16) ----------


def _agree_rank(rank: int, port: int, result_dir: str) -> None:
    import json
    import time

    from hwaware.distributed import from_rank0, on_every_rank
    from hwaware.errors import HwawareError
    from hwaware.train import _check_same_settings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen: dict = {}
    try:
        local = {"step": 15 if rank == 0 else 0, "w": torch.full((3,), float(rank))}  # each node's own last.pt
        shared = from_rank0(lambda: local)
        seen["shared"] = [shared["step"], shared["w"].tolist()]

        def fails_on_rank1():
            if rank == 1:
                raise HwawareError("data: /data/imagenet/train is missing")

        for name, call in (("gate", lambda: on_every_rank(fails_on_rank1)),
                           ("rank0", lambda: from_rank0(lambda: (_ for _ in ()).throw(HwawareError("checkpoint: bad")))),
                           ("settings", lambda: _check_same_settings(make_config(epochs=3 + rank), DIGITS, 1257, rank))):
            started = time.monotonic()
            try:
                call()
                seen[name] = None
            except HwawareError as exc:
                seen[name] = [str(exc), time.monotonic() - started]
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_every_rank_gets_rank0s_state_and_every_rank_stops_on_one_ranks_error(tmp_path):
    import json

    mp.start_processes(_agree_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["shared"] == seen[1]["shared"] == [15, [0.0, 0.0, 0.0]]
    assert seen[1]["gate"][0] == "data: /data/imagenet/train is missing"
    assert seen[0]["gate"][0] == "rank 1: data: /data/imagenet/train is missing"
    assert seen[0]["rank0"][0] == "checkpoint: bad" and seen[1]["rank0"][0] == "rank 0: checkpoint: bad"
    assert seen[1]["settings"][0].startswith("train: rank 1 was started with other settings than rank 0 (epochs: 3 ")
    assert seen[0]["settings"][0].startswith("rank 1: train: rank 1 was started with other settings")
    assert all(s[name][1] < 10 for s in seen for name in ("gate", "rank0", "settings"))  # seconds, not a timeout


def _node_command(port: int, node: int, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "hwaware.cli", "train", "--space", "digits",
            "--data", "digits", "--out", str(out), "--threads", "1", "--quiet", *flags]


def _two_nodes(port: int, outs: list[Path], flags: tuple[str, ...], logs: list[Path]) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(_node_command(port, node, outs[node], *flags), env=env, stdout=subprocess.DEVNULL,
                             stderr=open(logs[node], "w")) for node in range(2)]


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers (which torchrun starts in sessions of their own), as a node dies."""
    import signal

    try:
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in [*map(int, children), agent.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def _finish(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    for p in processes:
        if p.poll() is None:  # hung
            _kill_node(p)
    return codes


@pytest.mark.slow  # ~1-2 min: three two-node runs of two fresh interpreters each
def test_two_nodes_without_a_shared_folder_resume_after_a_kill(tmp_path):
    """Two torchrun agents on localhost, each with its own --out: killed mid-epoch, restarted, they finish as
    the uninterrupted run does (node 1 used to restart at step 0 against node 0's step 15 and hang)."""
    import time

    flags = ("--epochs", "2", "--batch-size", "64", "--strategy", "sandwich", "--checkpoint-every", "3")
    reference = [tmp_path / "ref0", tmp_path / "ref1"]
    logs = [tmp_path / "ref0.log", tmp_path / "ref1.log"]
    assert _finish(_two_nodes(_free_port(), reference, flags, logs), 300) == [0, 0], logs[0].read_text()[-2000:]

    outs, port = [tmp_path / "node0", tmp_path / "node1"], _free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    processes = _two_nodes(port, outs, flags, logs)
    deadline = time.monotonic() + 300
    while not (outs[0] / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in processes:
        _kill_node(p)
    _, meta = load_supernet(outs[0] / "last.pt")
    assert not meta["complete"] and meta["step"] % 9 != 0  # 629 images per rank: 9 steps an epoch; killed mid-epoch
    assert not (outs[1] / "last.pt").exists()  # node 1 has nothing of its own to resume from

    started = time.monotonic()
    codes = _finish(_two_nodes(port, outs, flags, logs), 120)
    seconds = time.monotonic() - started
    assert codes == [0, 0], (codes, logs[0].read_text()[-1500:], logs[1].read_text()[-1500:])
    print(f"two-node resume from step {meta['step']}: both nodes finished {seconds:.1f} s after the restart")
    assert f"rank 1: resuming from rank 0's checkpoint at epoch {meta['epoch'] + 1}, step {meta['step']}" in \
        logs[1].read_text()
    final = torch.load(outs[0] / "last.pt", weights_only=True)
    expected = torch.load(reference[0] / "last.pt", weights_only=True)
    assert final["complete"] and final["step"] == expected["step"] == 18
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def _write_imagefolder(root: Path, classes: int, train_per_class: int, val_per_class: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):  # each class its own mean colour, so there is something to learn
                pixels = rng.normal(60 * c + 40, 30, (36, 36, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow  # ~1-2 min: 2 ranks x 3 epochs of the full ImageNet augmentation on 2,400 small images
def test_torchrun_two_ranks_three_epochs_of_the_imagenet_recipe(tmp_path):
    """The default ImageNet recipe (RandAugment m9-mstd0.5-inc1, repeated augmentation, mixup/cutmix, random
    erasing, uniform sampling, global batch 1024 by accumulation) for 3 epochs: over 6,000 augmentations, where
    the 0-bit posterize crashed about once in 770 draws before it was made black."""
    import yaml

    from hwaware.space import SearchSpace

    _write_imagefolder(tmp_path / "images", classes=4, train_per_class=600, val_per_class=20)
    space = SearchSpace("tiny-imagenet-shaped", embed_dims=(32, 48), depths=(1, 2), num_heads=(1, 2),
                        mlp_ratios=(2.0,), head_dim=16, img_size=32, patch_size=8, num_classes=4)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space.to_dict()))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "hwaware.cli", "train", "--space", str(tmp_path / "space.yaml"), "--recipe", "imagenet",
               "--data", f"imagefolder:{tmp_path / 'images'}", "--out", str(out), "--epochs", "3", "--workers", "1",
               "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 1024 = 128 per rank x 2 ranks x 4 accumulated" in result.stderr
    assert "\r" not in result.stderr  # progress as lines in a captured log
    _, meta = load_supernet(out / "last.pt")
    # 1,200 images per rank: 9 micro-batches of 128, 2 steps of 4 accumulated an epoch
    assert meta["complete"] and meta["step"] == 6 and len(meta["history"]) == 3
