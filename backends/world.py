"""The processes that train one adapter together, in backend-neutral terms.

A run started by a launcher (`torchrun` for torch, `mlx.launch` for MLX) has `size` > 1 processes;
each backend's engine joins its own process group and exposes the result as `engine.world`. The
pipeline reads only this: every rank runs the same pipeline on the same global batches (data order
is a pure function of the seed), each engine trains on its rank's rows of every micro-batch, and only
the main rank writes (the run directory, metrics, checkpoints, adapters, progress).

A leaf: it reads the environment only; the backends do the joining.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

# the variables each launcher sets in every process it starts
LAUNCHER_ENV = {
    "torchrun": ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"),
    "mlx.launch": ("MLX_RANK",),
}
# the launcher whose process groups each backend can join
LAUNCHER_OF = {"torch": "torchrun", "mlx": "mlx.launch"}


class WorldError(RuntimeError):
    """A multi-process run that cannot go ahead as started; the message says why and what to do."""


@dataclass(frozen=True)
class World:
    """rank in [0, size); `launcher` names what started the processes (None: one plain process)."""

    rank: int = 0
    size: int = 1
    launcher: str | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n_rows: int) -> slice:
        """This rank's rows of a global micro-batch of `n_rows` rows (contiguous, equal shares)."""
        if n_rows % self.size:
            raise WorldError(
                f"a batch of {n_rows} rows does not split over {self.size} processes; choose a "
                f"--batch-size that is a multiple of {self.size}"
            )
        share = n_rows // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


SINGLE = World()
# the variable holding the rank in the processes each launcher starts
RANK_ENV = {"torchrun": "RANK", "mlx.launch": "MLX_RANK"}


def take_rows(batch: object, rows: slice) -> object:
    """The rows `rows` of a batch dataclass whose fields are (B, ...) arrays (an nf4core.Batch)."""
    return dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)}
    )


def launched_rank(env: Mapping[str, str] = os.environ) -> int:
    """The rank the launcher gave this process (0 without one): known before any group is joined,
    so a pipeline can keep the other ranks quiet from its first line."""
    launcher = detect_launcher(env)
    if launcher is None:
        return 0
    try:
        return int(env.get(RANK_ENV[launcher], "0"))
    except ValueError:
        return 0


def check_split(world: World, batch_rows: set[int], what: str) -> None:
    """Refuse, before anything is written, micro-batches of row counts that do not split evenly over
    the world (`what` names them for the message, e.g. "--batch-size 3")."""
    for n in sorted(batch_rows):
        if n % world.size:
            raise WorldError(
                f"{what}: a batch of {n} rows does not split over {world.size} processes; choose "
                f"a --batch-size (and a data size) whose batches are multiples of {world.size}"
            )


def detect_launcher(env: Mapping[str, str] = os.environ) -> str | None:
    """The launcher that started this process (its variables are set), or None."""
    for launcher, names in LAUNCHER_ENV.items():
        if all(n in env for n in names):
            return launcher
    return None


def check_launcher(backend: str, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a launcher the chosen backend cannot join (e.g. torchrun with --backend mlx), before
    anything is loaded: every process would otherwise train alone and write the same files."""
    launcher = detect_launcher(env)
    if launcher is not None and launcher != LAUNCHER_OF[backend]:
        raise WorldError(
            f"this process was started by {launcher}, which the {backend} backend cannot join; "
            f"start the {backend} backend with {LAUNCHER_OF[backend]}"
        )
