"""Where a run executes: the torch device a user names, the torchrun process group, and how ranks agree."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from hwaware.errors import HwawareError

T = TypeVar("T")


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


# ---- agreeing across ranks: no rank left waiting in a collective the others will never reach ----------

MESSAGE_BYTES = 1024  # an error line as it crosses ranks (longer ones are cut)


def _collective_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_every_rank(work: Callable[[], T]) -> T:
    """Run `work` here and stop every rank with a line if it failed (HwawareError) on any.

    The rank that failed raises its own error, the others raise it prefixed by that rank, so a
    multi-node job whose node 1 cannot read its data exits everywhere at once instead of
    leaving node 0 in the next collective until its timeout.
    """
    error, result = None, None
    try:
        result = work()
    except HwawareError as exc:
        error = exc
    if not _distributed():
        if error is not None:
            raise error
        return result
    device = _collective_device()
    mine = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8, device=device)
    if error is not None:
        text = str(error).encode()[:MESSAGE_BYTES]
        mine[0] = 1
        mine[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if error is not None:
        raise error
    for rank, message in enumerate(gathered):
        if int(message[0]):
            text = bytes(message[1:].cpu().tolist()).rstrip(b"\0").decode(errors="replace")
            raise HwawareError(f"rank {rank}: {text}")
    return result


def from_rank0(work: Callable[[], T]) -> T:
    """`work()` run on rank 0 alone, its result on every rank; if it fails there, every rank stops with its line.

    The result (tensors and Python primitives, as in a checkpoint) crosses as `torch.save` bytes and is
    read back with `weights_only=True`, so nothing but plain data is unpickled on the receiving ranks.
    """
    if not _distributed():
        return work()
    device, rank = _collective_device(), dist.get_rank()
    error, result, payload = None, None, b""
    if rank == 0:
        try:
            result = work()
            buffer = io.BytesIO()
            torch.save(result, buffer)
            payload = buffer.getvalue()
        except HwawareError as exc:
            error, payload = exc, str(exc).encode()[:MESSAGE_BYTES]
    header = torch.tensor([int(error is not None), len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    failed, size = (int(v) for v in header.tolist())
    if size:
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if rank == 0
                else torch.empty(size, dtype=torch.uint8, device=device))
        dist.broadcast(data, 0)
    if rank == 0:
        if error is not None:
            raise error
        return result
    raw = data.cpu().numpy().tobytes() if size else b""
    if failed:
        raise HwawareError(f"rank 0: {raw.decode(errors='replace')}")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
