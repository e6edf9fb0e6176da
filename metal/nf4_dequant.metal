// nf4_dequant: NF4 -> T, one thread per packed byte (two elements).
//   out[e] = T(quant_map[code(e)] * absmax[e / BS])   (product in float32, rounded once, then cast)
// Layout: packed uint8 ((numel + 1) / 2,), bitsandbytes' order: element 2i in the HIGH nibble of
// byte i, element 2i + 1 in the low nibble (MLX's own formats are the other way round). The tensor is
// flat row-major; blocks of BS elements share one float32 absmax; the last block may be partial.
// Inputs: packed, absmax float (n_blocks,), quant_map float (16,), dims uint32 [numel].
// Output: out T (numel,). Template: T (output type), BS (int, blocksize).
// Tested by the C++ shim, bit-exact vs nf4core on odd sizes; no SIMD-group functions or barriers.
uint i = thread_position_in_grid.x;
uint numel = dims[0];
uint e = 2 * i;
if (e >= numel) {
    return;
}
uint8_t bits = packed[i];
out[e] = static_cast<T>(quant_map[bits >> 4] * absmax[e / BS]);
if (e + 1 < numel) {
    out[e + 1] = static_cast<T>(quant_map[bits & 15] * absmax[(e + 1) / BS]);
}
