"""Compute backends (PyTorch, MLX). Each lives in its own subpackage; none imports another."""
