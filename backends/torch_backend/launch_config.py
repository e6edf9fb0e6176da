"""Tile sizes, pipeline stages and warps of the Triton kernels, chosen per call from the GPU's
compute capability, the dtype and the number of rows. Pure data: importing it imports no triton.

Every configuration `matmul_configs` and `gemv_config` can return is compiled ahead of time for
sm_80, sm_86, sm_89, sm_90 and sm_120 by tests/backends/torch_backend/test_triton_aot.py, which
checks its shared memory against `SHARED_MEMORY_PER_BLOCK` and its registers and spills against
`REGISTER_BUDGET` / `SPILL_BUDGET_BYTES`. The first matmul configuration is the preferred one; the
next ones are run-time fallbacks (smaller tiles) for an `OutOfResources` at launch.
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


# Tiles the interpreter runs by default in tests: small, so the CPU is quick.
INTERPRETER_MATMUL = MatmulConfig(16, 16, 16, num_stages=1)
INTERPRETER_GEMV = GemvConfig(16, 32, num_warps=4)
FALLBACK_MATMUL = MatmulConfig(16, 32, 32, num_stages=2)  # after an OutOfResources
GEMV = GemvConfig(32, 256, num_warps=8)  # 4 warps need 255 registers and spill


def _large_shared_memory(capability: tuple[int, int] | None) -> bool:
    return SHARED_MEMORY_PER_BLOCK.get(capability, SMALLEST_SHARED_MEMORY) >= 160 * 1024


def matmul_configs(
    capability: tuple[int, int] | None, dtype_bytes: int, m: int
) -> tuple[MatmulConfig, ...]:
    """Preferred configuration first, then the smaller fallback. `capability` (major, minor) of the
    GPU (None or an unknown one: the 99 KB parts' choice), `dtype_bytes` of the operands (4 or 2),
    `m` rows of the left operand."""
    if dtype_bytes == 4:
        # FP32 dots run as FMAs ("ieee"): a 64-row tile needs 112 KB at 3 stages and ~5 KB of
        # per-thread stack; 32 x 64 x 32 needs 48 KB and almost no stack.
        preferred = MatmulConfig(16 if m <= SMALL_M else 32, 64, 32, num_stages=3)
    elif m <= SMALL_M:
        preferred = MatmulConfig(16, 64, 64, num_stages=3)
    else:
        # 16-bit 64 x 64 x 64: 72-80 KB at 3 stages (fits 99 KB); a 4th stage where 163+ KB allow.
        stages = 4 if _large_shared_memory(capability) else 3
        preferred = MatmulConfig(64, 64, 64, num_stages=stages)
    return (preferred, FALLBACK_MATMUL)


def gemv_config(capability: tuple[int, int] | None) -> GemvConfig:  # noqa: ARG001 - one for all
    return GEMV
