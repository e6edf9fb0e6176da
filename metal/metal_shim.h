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
// bfloat16 conversions (the shim runs T = float), and fast-math contraction (the shim compiles with
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
