"""Kernels (Triton) with their plain-PyTorch references."""
