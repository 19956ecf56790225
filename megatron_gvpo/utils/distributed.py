"""Start torch.distributed the same way under torchrun, srun or as a plain single process."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (for a rendezvous hosted there)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def routable_address(peer_host: str) -> str:
    """This machine's address on the route to `peer_host` (what a peer there can connect back to); no packet
    is sent: connecting a UDP socket only picks the route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(peer_host), 9))
        return s.getsockname()[0]


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Initialise the default process group (NCCL with CUDA, gloo without); return (rank, world_size).

    Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them it starts a
    one-process group on a free local port. The finite timeout turns a hung collective into an error.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes))
    return rank, world_size


def broadcast_object(obj, src: int = 0):
    """Collective: `obj` of global rank `src` on every rank (picklable)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn, *args, recoverable: type[Exception] | None = None):
    """Collective: fn(*args) on global rank 0, its result on every rank. An exception there raises on every
    rank (a rank left waiting in the next collective would hang the job): the original on rank 0; on the others
    a `recoverable` (the same type, with rank 0's message) when it was one, which the caller may recover from,
    else a RuntimeError naming it."""
    out, raised = None, None
    if dist.get_rank() == 0:
        try:
            out = (fn(*args), None, False)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            kind = recoverable is not None and isinstance(e, recoverable)
            raised, out = e, (None, f"{type(e).__name__} on rank 0: {e}", kind)
    result, error, is_recoverable = broadcast_object(out)
    if raised is not None:
        raise raised
    if error is not None:
        raise recoverable(error) if is_recoverable else RuntimeError(error)
    return result
