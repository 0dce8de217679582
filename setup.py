"""Install the project and build the fused kernels of csrc/ as the extension `semi._C`.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

The CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit is found and torch has CUDA,
or when FORCE_CUDA=1 (to compile them on a machine without a GPU); FORCE_CUDA=0 builds the CPU only.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (e.g. "8.0;9.0"); MAX_JOBS bounds parallel compilation.
`--no-build-isolation` builds against the torch already installed (the extension must match it exactly).
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _toolkit_root_from_nvcc() -> str | None:
    """The toolkit root nvcc itself uses (its TOP), which is right where a symlinked nvcc misleads torch."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        line = line.lstrip("#$ ").strip()
        if line.startswith("TOP="):
            return os.path.realpath(line[len("TOP=") :])
    return None


def _has_cudart(root: str | None) -> bool:
    return root is not None and any(
        os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib")
    )


def _set_cuda_home() -> None:
    # torch guesses CUDA_HOME from the directory above nvcc; when nvcc is a link (e.g. /usr/local/bin/nvcc)
    # that guess lacks the libraries. Ask nvcc for its root instead, unless the user has chosen one.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if _has_cudart(guess):
        return
    root = _toolkit_root_from_nvcc()
    if _has_cudart(root):
        os.environ["CUDA_HOME"] = root


def _extensions():
    _set_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA")
    with_cuda = force == "1" or (force != "0" and torch.cuda.is_available() and CUDA_HOME is not None)
    if with_cuda and CUDA_HOME is None:
        sys.exit("setup.py: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to the toolkit root")

    sources = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the selects of the math; torch builds with it too.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    extra = {"cxx": cxx_flags}
    macros = []
    extension = CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        # --fmad=false: no a * b + c contracted into one rounding, as the CPU build (ISO C++, no -ffast-math)
        # does not contract: float32 kernels then compute what the CPU kernels compute, bit for bit, except
        # where they call the C library's exp / log. The kernels are bound by memory, not by arithmetic.
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--fmad=false"]
        macros.append(("SSOD_WITH_CUDA", None))
        extension = CUDAExtension
    print(f"setup.py: building semi._C for CPU{' and CUDA' if with_cuda else ' only'}")
    ext = extension(
        name="semi._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ssod",
    version="0.1.0",
    description="Semi-supervised object detection in plain PyTorch: Soft Teacher, Dense Teacher and SED",
    python_requires=">=3.10",
    packages=["detectors", "semi", "data", "engine"],
    py_modules=["structures"],  # batch types and box geometry, imported by every package
    install_requires=["torch", "torchvision", "numpy", "pycocotools", "pillow", "tqdm", "ninja"],
    # Optional: TensorBoard event files (train.py --tensorboard) and the plots of `python -m engine.plot`.
    extras_require={"tb": ["tensorboard"], "plot": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
