// nf4_absmax_offset: second half of the double-quant absmax reconstruction (see nf4_absmax_scale).
//   absmax[i] = scaled[i] + offset[0]                                 (float32, one rounding)
// Inputs: scaled float (n_blocks,), offset float (1,), dims uint32 [n_blocks].
// Output: absmax float (n_blocks,). Tested by the C++ shim; no SIMD-group functions or barriers.
uint i = thread_position_in_grid.x;
if (i >= dims[0]) {
    return;
}
absmax[i] = scaled[i] + offset[0];
