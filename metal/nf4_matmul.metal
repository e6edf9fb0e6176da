// nf4_matmul: fused dequantize + matmul for the forward pass, y = x W^T.
//   x T (M, K) row-major, W NF4 (N, K) flat row-major (element e = n * K + k), y T (M, N).
//   One thread per output element: thread_position_in_grid = (n, m). The weight element is decoded
//   in float32 exactly as nf4_dequant does (high nibble first) and accumulated in float32.
// Inputs: x, packed uint8, absmax float (n_blocks,), quant_map float (16,), dims uint32 [M, N, K].
// Output: y T (M, N). Template: T, BS (int).
// Tested by the C++ shim within float32 tolerance of nf4core on odd shapes (K odd: rows that start
// mid-byte). No SIMD-group functions or barriers; its speed is measured by bench/metal_check.py.
uint n = thread_position_in_grid.x;
uint m = thread_position_in_grid.y;
uint M = dims[0];
uint N = dims[1];
uint K = dims[2];
if (n >= N || m >= M) {
    return;
}
uint row = n * K;
float acc = 0.0f;
for (uint k = 0; k < K; ++k) {
    uint e = row + k;
    uint8_t bits = packed[e >> 1];
    uint code = (e & 1) ? (bits & 15) : (bits >> 4);
    float w = quant_map[code] * absmax[e / BS];
    acc += static_cast<float>(x[m * K + k]) * w;
}
y[m * N + n] = static_cast<T>(acc);
