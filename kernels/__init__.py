"""Triton kernels of scadfast (installed as ``scadfast.kernels``).

Each op module (``spectral``, ``san``, ``patch_hinge``) holds the ``@triton.jit`` kernels and the
thin launchers of one op (``<op>_forward`` / ``<op>_backward``), named like its module in
``scadfast.ops``; ``_common`` holds what the launchers share (device context, accumulation dtype).
The custom ops, their autograd, the reference implementation and the ``impl=`` switch live in
``scadfast.ops``. To run kernels on CPU tensors (tests only), set ``TRITON_INTERPRET=1`` before
importing this package.
"""
