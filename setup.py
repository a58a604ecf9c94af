"""Builds nreft_engine._C from csrc/: C++ always, CUDA sources when the installed torch has CUDA (and nvcc
is found). The C++ standard is left to torch, which passes the one its headers need. -fopenmp makes
at::parallel_for run on torch's OpenMP threads (without it the CPU kernels run on one thread); the
libgomp it links is the one torch has already loaded. libstdc++ is always linked as the shared library:
a static copy beside the one torch loads crashed _C's first formatted error message (two copies of the
std::locale facets; seen on a GPU machine whose Python links C++ extensions with -static-libstdc++)."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CXX_FLAGS = ["-O3", "-fopenmp"]


class BuildExtensionSharedLibstdcxx(BuildExtension):
    """torch's BuildExtension (ninja), with -static-libstdc++ dropped from the link commands."""

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx"):
            command = getattr(self.compiler, attr, None)
            if command and "-static-libstdc++" in command:
                setattr(self.compiler, attr, [arg for arg in command if arg != "-static-libstdc++"])
        super().build_extensions()


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("NREFT_NO_CUDA", "0") != "1"
    )
    if use_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        return CUDAExtension(
            "nreft_engine._C",
            cpp + cu,
            define_macros=[("NREFT_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("nreft_engine._C", cpp, extra_compile_args=CXX_FLAGS, extra_link_args=["-fopenmp"])


# NREFT_REUSE_BUILT_EXTENSION=1 installs without building _C, reusing the one that an editable install with
# the same torch built in place (a second venv over the same checkout, e.g. the Makefile's verl venv)
setup(
    ext_modules=[] if os.environ.get("NREFT_REUSE_BUILT_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtensionSharedLibstdcxx.with_options(use_ninja=True)},
)
