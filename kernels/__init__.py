"""Triton kernels of deberta_fast (shipped as ``deberta_fast._kernels``)."""
