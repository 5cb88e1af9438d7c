"""Where a run executes: the torch device a user names, and the torchrun process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hwaware.errors import HwawareError


def parse_device(spec: str | torch.device) -> torch.device:
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise HwawareError(f"device: {spec!r} is not a device (cpu, cuda, cuda:1, auto)") from None


def setup_distributed(device_spec: str) -> tuple[int, int, torch.device, bool]:
    """Join the torchrun group if there is one (gloo on CPU, NCCL on GPU); returns rank, world, device, owned."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_spec == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(device_spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HwawareError(f"device: {device_spec!r} asked for CUDA but none is available")
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device, False
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, owned


