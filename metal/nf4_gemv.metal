// nf4_gemv: the small-batch forward path, y = x W^T for at most ROWS rows of x (decode: M <= 8).
//   x T (M, K), W NF4 (N, K) flat row-major, y T (M, N). One thread per output column n: it decodes
//   its weight row once, a byte (two elements) at a time, and applies it to all M rows of x, so the
//   weight is read once per token batch instead of once per row.
// Inputs: x, packed uint8, absmax float (n_blocks,), quant_map float (16,), dims uint32 [M, N, K].
// Output: y T (M, N). Template: T, BS (int), ROWS (int, >= M).
// Tested by the C++ shim within float32 tolerance on odd shapes. No SIMD-group functions or barriers.
uint n = thread_position_in_grid.x;
uint M = dims[0];
uint N = dims[1];
uint K = dims[2];
if (n >= N) {
    return;
}
float acc[ROWS];
for (uint m = 0; m < ROWS; ++m) {
    acc[m] = 0.0f;
}
uint row = n * K;
uint k = 0;
if (row & 1) {  // an odd row start: its first element is the low nibble of a shared byte
    float w = quant_map[packed[row >> 1] & 15] * absmax[row / BS];
    for (uint m = 0; m < M; ++m) {
        acc[m] += static_cast<float>(x[m * K]) * w;
    }
    k = 1;
}
for (; k + 1 < K; k += 2) {
    uint e = row + k;  // even: a whole byte
    uint8_t bits = packed[e >> 1];
    float w0 = quant_map[bits >> 4] * absmax[e / BS];
    float w1 = quant_map[bits & 15] * absmax[(e + 1) / BS];
    for (uint m = 0; m < M; ++m) {
        acc[m] += static_cast<float>(x[m * K + k]) * w0;
        acc[m] += static_cast<float>(x[m * K + k + 1]) * w1;
    }
}
if (k < K) {  // an odd row end: the high nibble of the last byte
    uint e = row + k;
    float w = quant_map[packed[e >> 1] >> 4] * absmax[e / BS];
    for (uint m = 0; m < M; ++m) {
        acc[m] += static_cast<float>(x[m * K + k]) * w;
    }
}
for (uint m = 0; m < M; ++m) {
    y[m * N + n] = static_cast<T>(acc[m]);
}
