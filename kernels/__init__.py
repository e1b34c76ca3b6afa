"""Triton kernels for fastres (imported as fastres.kernels). A leaf: imports torch and triton only."""
