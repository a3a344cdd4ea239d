"""Build the C++/CUDA extension and list the packages (the rest of the packaging is in pyproject.toml).

The C++ extension ``scadfast._C`` (conditioning augmentation, ``csrc/``) always builds its CPU path;
its CUDA path builds when a CUDA toolkit is found. ``SCADFAST_CUDA=0`` forces CPU only,
``SCADFAST_CUDA=1`` requires CUDA (fails if no toolkit). Without a visible GPU,
``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100, H100/H200). The Triton kernels in ``kernels/``
are installed as ``scadfast.kernels``.

Install for development (uses the torch you already have, e.g. your own CUDA build):

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """A directory that really holds the toolkit (bin/nvcc and include/cuda_runtime.h).

    ``nvcc`` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), so the directory above it
    is only used when it passes the same check.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for cand in candidates:
        if _is_cuda_home(cand):
            return cand
    return None


want = os.environ.get("SCADFAST_CUDA", "auto").lower()
cuda_home = _find_cuda_home() if want != "0" else None
if want == "1" and cuda_home is None:
    raise RuntimeError("SCADFAST_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
ext_modules = []
if cpp_sources:
    # No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++17 for
    # older torch, C++20 for recent releases); a hard-coded one breaks the build with the other.
    cxx_flags = ["-O3"]
    if cuda_home and cu_sources:
        import torch

        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext_modules.append(
            CUDAExtension(
                "scadfast._C",
                cpp_sources + cu_sources,
                define_macros=[("SCADFAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    else:
        ext_modules.append(CppExtension("scadfast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}))

# Every package under scadfast/, plus kernels/ installed as scadfast.kernels (its directory is mapped in
# pyproject.toml's package-dir). Found here, not listed statically, so a new subpackage needs no edit.
packages = find_packages(include=["scadfast", "scadfast.*"]) + ["scadfast.kernels"]

setup(
    packages=packages,
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
