"""The PyTorch backend: NF4 weights, QLoRA layers, the Llama-family model and training.

CUDA tensors use the Triton kernels in `cuda/` when triton is importable; everything else (and any
tensor when forced) takes the plain-torch reference path. The choice is made per call (see dispatch).
"""
