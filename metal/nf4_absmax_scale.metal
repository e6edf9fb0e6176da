// nf4_absmax_scale: first half of the double-quant absmax reconstruction (one thread per NF4 block).
//   scaled[i] = dq_quant_map[dq_codes[i]] * dq_scales[i / DQ_BS]     (float32, one rounding)
// nf4_absmax_offset then adds the offset in a second launch, so no compiler can contract the
// multiply and the add into an FMA (Metal's fast math would); the result is nf4core's bit for bit.
// Inputs: dq_codes uint8 (n_blocks,), dq_scales float (n_nested,), dq_quant_map float (256,),
//         dims uint32 [n_blocks]. Output: scaled float (n_blocks,). Template: DQ_BS (int).
// Tested by the C++ shim (bit-exact vs nf4core); no SIMD-group functions or barriers.
uint i = thread_position_in_grid.x;
if (i >= dims[0]) {
    return;
}
scaled[i] = dq_quant_map[dq_codes[i]] * dq_scales[i / DQ_BS];
