"""The torch process group of a run started by `torchrun`, and the collectives the engine needs.

`join(device)` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins
with NCCL for a CUDA device (each rank on GPU LOCAL_RANK) or gloo for the CPU, and returns the
backend-neutral `World` and the device this rank computes on. A process no launcher started stays
a group of one and joins nothing.

Note (failures): a collective waits for every rank. A rank that dies closes its connections, which
ends the others' collectives at once (gloo) or after the group's timeout, NF4_QLORA_DIST_TIMEOUT
seconds (default 600; torchrun's agent also stops the other ranks when one fails). Either way the
survivors raise WorldError with one line instead of waiting forever.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ..world import SINGLE, World, WorldError, detect_launcher

TIMEOUT_ENV = "NF4_QLORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def timeout_from_env() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def join(device: str) -> tuple[World, torch.device]:
    """This process's World and compute device: `device` ("cpu", "cuda", "cuda:N") alone, or, under
    torchrun, the rank's place in the process group (NCCL on CUDA, gloo on the CPU)."""
    if detect_launcher() != "torchrun":
        return SINGLE, torch.device(device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size == 1:
        return World(0, 1, "torchrun"), torch.device(device)
    kind = torch.device(device).type
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise WorldError(
                f"rank {rank} has LOCAL_RANK {local}, but this machine shows "
                f"{torch.cuda.device_count()} CUDA devices; start at most that many processes per "
                "node (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
        here = torch.device("cuda", local)
    elif kind == "cpu":
        here = torch.device("cpu")
    else:
        raise WorldError(f"device {device!r}: torchrun runs on CUDA (NCCL) or the CPU (gloo)")
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        with collective_errors(World(rank, size, "torchrun")):
            dist.init_process_group(
                backend,
                timeout=timeout_from_env(),
                device_id=here if kind == "cuda" else None,
            )
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size(), "torchrun"), here


_finished: list[bool] = []


def run_finished() -> None:
    """This rank's run ended normally: at exit it waits for the others (see `_leave`)."""
    _finished.append(True)


def _leave() -> None:
    """At exit, after a run that ended normally, every rank waits for the others before the group
    is torn down: a rank that tore down gloo while another was still working (the main rank writes
    the outputs last) was killed by SIGABRT now and then ("terminate called without an active
    exception", ~1 run in 20). After a failed or interrupted run a peer may be gone or stopped, so
    nobody waits."""
    if not dist.is_initialized():
        return
    if _finished and dist.get_backend() == "gloo":  # (NCCL's teardown was not seen to fail)
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(world: World) -> Iterator[None]:
    """A collective that fails (another rank died, stopped, or the timeout passed) ends this rank
    with one WorldError line instead of a backend traceback."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if world.size == 1 or isinstance(e, WorldError) or not _is_collective_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorldError(
            f"rank {world.rank} of {world.size}: lost the other processes of the run ({first}); "
            f"another rank failed or stopped (see its error), or a collective waited longer than "
            f"{TIMEOUT_ENV}={timeout_from_env().total_seconds():g} s"
        ) from e


def _is_collective_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def all_reduce_sum(values: Sequence[torch.Tensor]) -> None:
    """Sum `values` over the ranks, in place, with one collective (one flat buffer per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for v in values:
        by_dtype.setdefault(v.dtype, []).append(v)
    for group in by_dtype.values():
        flat = torch.cat([v.reshape(-1) for v in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for v in group:
            v.copy_(flat[offset : offset + v.numel()].view_as(v))
            offset += v.numel()
