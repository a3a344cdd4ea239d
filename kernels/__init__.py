"""Triton kernels of scadfast (installed as ``scadfast.kernels``).

Each module holds the ``@triton.jit`` kernels and a thin launcher for one op; the autograd wrapper,
the reference implementation and the ``impl=`` switch live in ``scadfast.ops``. To run kernels on
CPU tensors (tests only), set ``TRITON_INTERPRET=1`` before importing this package.
"""
