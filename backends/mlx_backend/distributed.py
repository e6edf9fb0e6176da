"""Data parallel on `mx.distributed`: join the group `mlx.launch` started and add up adapter gradients.

`mlx.launch --backend ring` starts every process with MLX_RANK and MLX_HOSTFILE (a JSON list of
each rank's address, empty when it started one process); `join_world` turns that into the
backend-neutral `World` plus the `Summer` that all-sums across it. Without a launcher nothing is
joined: a world of one and no communication.

No rank waits forever: joining gives up after JOIN_TIMEOUT_S with a message, and when a rank dies
mid-run its peers' next all-sum fails ("connection to a peer was lost") while mlx.launch ends them.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Mapping

from mlx.utils import tree_flatten, tree_unflatten

from ..world import SINGLE, World, WorldError, detect_launcher
from ._mlx import mx

JOIN_TIMEOUT_S = 300.0  # how long a rank waits for the others to join the ring


class Summer:
    """Element-wise sums over the ranks of an `mx.distributed` group, one message per call."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group

    def all_sum(self, tree):
        """`tree` (nested dicts/lists of arrays) summed over the ranks, in float32: its leaves travel
        as one flat vector, so a step costs one round of communication however many adapters."""
        leaves = tree_flatten(tree)
        flat = mx.concatenate([a.astype(mx.float32).reshape(-1) for _, a in leaves])
        summed = mx.distributed.all_sum(flat, group=self.group)
        offsets, start = [], 0
        for _, a in leaves[:-1]:
            start += a.size
            offsets.append(start)
        parts = mx.split(summed, offsets) if offsets else [summed]
        return tree_unflatten([(k, p.reshape(a.shape)) for (k, a), p in zip(leaves, parts)])


def _ring_hosts(env: Mapping[str, str]) -> str:
    path = env.get("MLX_HOSTFILE")
    if not path:
        raise WorldError(
            "mlx.launch set MLX_RANK but no MLX_HOSTFILE; start the run with mlx.launch"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise WorldError(f"{path}: cannot read mlx.launch's host file ({e.strerror})") from None


# Run by a child process while the ring forms: mx.distributed.init holds the GIL while it waits for
# its peers, so no thread of this process could end a wait for a peer that never starts.
_WATCHDOG = """
import os, sys, time
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == parent:  # still joining (a finished join kills this process first)
    print(message, file=sys.stderr, flush=True)
    os.kill(parent, 9)
"""


@functools.cache
def _join_ring(rank: int) -> mx.distributed.Group:
    message = (
        f"rank {rank}: no answer from the other mlx.launch processes after {JOIN_TIMEOUT_S:g} s "
        "(did one fail to start?); exiting"
    )
    args = [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(JOIN_TIMEOUT_S), message]
    watchdog = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        return mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        raise WorldError(f"rank {rank}: cannot join the mlx.launch ring group ({e})") from None
    finally:
        watchdog.kill()
        watchdog.wait()


def join_world(env: Mapping[str, str] = os.environ) -> tuple[World, Summer | None]:
    """(this process's World, the Summer over it or None for a world of one)."""
    if detect_launcher(env) != "mlx.launch":
        return SINGLE, None
    rank = int(env["MLX_RANK"])
    if not _ring_hosts(env):  # `mlx.launch -n 1`: a ring of one has no host list
        return World(rank, 1, "mlx.launch"), None
    group = _join_ring(rank)
    if group.rank() != rank:
        raise WorldError(f"MLX_RANK is {rank} but the ring group says rank {group.rank()}")
    world = World(group.rank(), group.size(), "mlx.launch")
    return world, (Summer(group) if world.size > 1 else None)
