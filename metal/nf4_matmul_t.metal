// nf4_matmul_t: fused dequantize + matmul for the input gradient, dx = dy W.
//   dy T (M, N) row-major, W NF4 (N, K) flat row-major (element e = n * K + k), dx T (M, K).
//   One thread per output element: thread_position_in_grid = (k, m); the thread walks down column k
//   of W. Accumulates in float32.
// Inputs: dy, packed uint8, absmax float (n_blocks,), quant_map float (16,), dims uint32 [M, N, K].
// Output: dx T (M, K). Template: T, BS (int).
// Tested by the C++ shim within float32 tolerance on odd shapes. No SIMD-group functions or barriers.
uint k = thread_position_in_grid.x;
uint m = thread_position_in_grid.y;
uint M = dims[0];
uint N = dims[1];
uint K = dims[2];
if (k >= K || m >= M) {
    return;
}
float acc = 0.0f;
for (uint n = 0; n < N; ++n) {
    uint e = n * K + k;
    uint8_t bits = packed[e >> 1];
    uint code = (e & 1) ? (bits & 15) : (bits >> 4);
    float w = quant_map[code] * absmax[e / BS];
    acc += static_cast<float>(dy[m * N + n]) * w;
}
dx[m * K + k] = static_cast<T>(acc);
