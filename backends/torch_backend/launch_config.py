"""Tile sizes, pipeline stages and warps of the Triton kernels: the candidates for the GPU's compute
capability, the dtype and the number of rows. Pure data: importing it imports no triton.

Every configuration `matmul_configs` and `gemv_configs` can return is compiled ahead of time for
sm_80, sm_86, sm_89, sm_90 and sm_120 by tests/backends/torch_backend/test_triton_aot.py, which
checks its shared memory against `SHARED_MEMORY_PER_BLOCK` and its registers and spills against
`REGISTER_BUDGET` / `SPILL_BUDGET_BYTES`. The first configuration is the one chosen without
autotuning (autotune.py times them all once per GPU and shape); the last matmul one is the smallest,
the fallback for an `OutOfResources` at launch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Opt-in shared memory per thread block in bytes, by compute capability (the CUDA C++ Programming
# Guide's "technical specifications per compute capability": 163 KB, 99 KB, 227 KB).
SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 163 * 1024,  # A100
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40
    (8, 7): 163 * 1024,  # Jetson Orin
    (8, 9): 99 * 1024,  # RTX 40xx, L4, L40S
    (9, 0): 227 * 1024,  # H100, H200
    (12, 0): 99 * 1024,  # RTX 50xx
}
SMALLEST_SHARED_MEMORY = min(SHARED_MEMORY_PER_BLOCK.values())
REGISTER_BUDGET = 255  # per thread; the hardware maximum
SPILL_BUDGET_BYTES = 1024  # per-thread stack (spilled registers) a configuration may use

GEMV_MAX_ROWS = 8  # at most this many rows take the GEMV kernel in the forward
SMALL_M = 16  # at most this many rows take the short matmul tile


@dataclass(frozen=True)
class MatmulConfig:
    BM: int
    BN: int
    BR: int
    num_stages: int
    num_warps: int = 4

    def tiles(self) -> dict:
        return {"BM": self.BM, "BN": self.BN, "BR": self.BR}

    def options(self) -> dict:
        return {"num_stages": self.num_stages, "num_warps": self.num_warps}


@dataclass(frozen=True)
class GemvConfig:
    BN: int
    BK: int
    num_warps: int

    def tiles(self) -> dict:
        return {"BN": self.BN, "BK": self.BK}

    def options(self) -> dict:
        return {"num_warps": self.num_warps}


# Tiles the interpreter runs in tests: small, so the CPU is quick (two, so autotuning has a choice).
INTERPRETER_MATMUL = (
    MatmulConfig(16, 16, 16, num_stages=1),
    MatmulConfig(16, 32, 16, num_stages=1),
)
INTERPRETER_GEMV = (GemvConfig(16, 32, num_warps=4), GemvConfig(32, 32, num_warps=4))
FALLBACK_MATMUL = MatmulConfig(16, 32, 32, num_stages=2)  # after an OutOfResources
# GEMV: 4 warps at 32 x 256 need 255 registers and spill; the others trade rows for columns.
GEMV = (GemvConfig(32, 256, num_warps=8), GemvConfig(64, 128, num_warps=8))
GEMV += (GemvConfig(16, 512, num_warps=8),)


def _large_shared_memory(capability: tuple[int, int] | None) -> bool:
    return SHARED_MEMORY_PER_BLOCK.get(capability, SMALLEST_SHARED_MEMORY) >= 160 * 1024


def matmul_configs(
    capability: tuple[int, int] | None, dtype_bytes: int, m: int
) -> tuple[MatmulConfig, ...]:
    """Preferred configuration first, then alternatives of other shapes for autotuning, then the
    smaller fallback. `capability` (major, minor) of the GPU (None or an unknown one: the 99 KB
    parts' choice), `dtype_bytes` of the operands (4 or 2), `m` rows of the left operand."""
    if dtype_bytes == 4:
        # FP32 dots run as FMAs ("ieee"): a 64-row tile needs 112 KB at 3 stages and ~5 KB of
        # per-thread stack; 32 x 64 x 32 needs 48 KB and almost no stack (32 x 128 spills 2.6 KB).
        if m <= SMALL_M:
            preferred = MatmulConfig(16, 64, 32, num_stages=3)
            others = (MatmulConfig(16, 128, 32, num_stages=2), MatmulConfig(16, 32, 32, 3))
        else:
            preferred = MatmulConfig(32, 64, 32, num_stages=3)
            others = (MatmulConfig(32, 32, 32, num_stages=3), MatmulConfig(16, 64, 32, 3))
    elif m <= SMALL_M:
        # 16 x 128 x 64 and 16 x 64 x 128 need 130+ KB at 3 stages: over the 99 KB parts
        preferred = MatmulConfig(16, 64, 64, num_stages=3)
        others = (MatmulConfig(16, 64, 64, num_stages=2), MatmulConfig(16, 32, 64, 3))
    else:
        # 16-bit 64 x 64 x 64: 72-80 KB at 3 stages (fits 99 KB); a 4th stage where 163+ KB allow.
        stages = 4 if _large_shared_memory(capability) else 3
        preferred = MatmulConfig(64, 64, 64, num_stages=stages)
        others = (MatmulConfig(128, 64, 64, 3, num_warps=8), MatmulConfig(64, 128, 64, 2, 8))
    return (preferred, *others, FALLBACK_MATMUL)


def gemv_configs(capability: tuple[int, int] | None) -> tuple[GemvConfig, ...]:  # noqa: ARG001
    """Preferred first; the same candidates on every GPU."""
    return GEMV
