"""Fused Triton operations: one file per operation, each with its kernels, launchers and autograd."""
