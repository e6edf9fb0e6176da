// metal_shim.h: just enough of the Metal Shading Language for the kernel bodies in this folder to
// compile as C++17 on Linux (tests/backends/mlx_backend/test_metal_shim.py), where there is no Metal.
//
// What it provides: the address-space qualifiers (device, constant, threadgroup, thread) as nothing,
// `uint` and `uint3`, MLX's fixed-width names, and nothing else. The test driver declares the
// kernel parameters as MLX's generated signature does (inputs `const device T*`, outputs `device T*`,
// `uint3 thread_position_in_grid`) and calls the body once per grid position, one thread at a time.
//
// What it cannot check: SIMD-group functions and threadgroup barriers (the bodies use neither, so
// each thread's result depends only on its own loop), memory coalescing and speed, Metal's half and
// bfloat16 conversions beyond round-to-nearest-even (the types below round that way), and
// fast-math contraction (the shim compiles with
// -ffp-contract=off; on Metal the absmax step is split over two launches instead).
#pragma once

#include <cmath>
#include <cstdint>

#define device
#define constant
#define threadgroup
#define thread

typedef unsigned int uint;

struct uint3 {
    uint x, y, z;
};

// MLX's names of the 16-bit float types. half: the compiler's IEEE binary16 (float -> half
// rounds to nearest even). bfloat16_t: the top 16 bits of a float32, rounded to nearest even
// (finite values), as Metal's bfloat and MLX's bfloat16 round.
typedef _Float16 float16_t;
typedef float16_t half;

struct bfloat16_t {
    uint16_t bits;
    bfloat16_t() = default;
    bfloat16_t(float value) {  // NOLINT: implicit, like Metal's conversions
        uint32_t u;
        __builtin_memcpy(&u, &value, 4);
        bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    operator float() const {
        uint32_t u = static_cast<uint32_t>(bits) << 16;
        float value;
        __builtin_memcpy(&value, &u, 4);
        return value;
    }
};
