"""Triton kernels (imported lazily: ``import cpkernels`` does not import triton)."""
