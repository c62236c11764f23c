"""Triton kernels of mrprune, installed as ``mrprune.triton_kernels`` (never as a top-level ``triton_kernels``)."""
