"""Triton backend: kernels and host launchers (see dw.py).

Importing this package does not import Triton; import ``convmixer_kernels.triton.dw`` for the
depthwise ops.  For CPU tensors, set ``TRITON_INTERPRET=1`` before that import.
"""
