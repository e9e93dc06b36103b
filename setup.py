"""Build script for idid_kernels and its C++/CUDA extension ``idid_kernels._C``.

Install (torch must already be installed; the build imports it):

    pip install --no-build-isolation -e .

There is deliberately no ``pyproject.toml`` build requirement on torch: an isolated build
environment would download the newest CUDA build of torch instead of using the installed one.

Environment switches (read at build time):

    IDID_KERNELS_NO_EXT=1     build no extension (the package runs on the reference backend)
    IDID_KERNELS_NO_CUDA=1    build the CPU extension even when torch has CUDA and nvcc is found
    IDID_KERNELS_CUDA_ARCH    nvcc architectures, e.g. "80;90" (default: TORCH_CUDA_ARCH_LIST or "80;90")
    IDID_KERNELS_DEBUG=1      -O0 -g builds
    MAX_JOBS                  parallel compile jobs for ninja (torch.utils.cpp_extension reads it)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _extensions():
    if _flag("IDID_KERNELS_NO_EXT"):
        print("idid_kernels: IDID_KERNELS_NO_EXT set, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("idid_kernels: torch is not importable, building no extension "
              "(install torch first, then pip install --no-build-isolation -e .)", file=sys.stderr)
        return [], {}

    debug = _flag("IDID_KERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math -fno-math-errno (as torch's own build): lets GCC if-convert and vectorise
    # the clamps and exp polynomial of csrc/cpu/vec_math.cpp; nothing here relies on FP traps or errno.
    cxx = opt + ["-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DIDID_KERNELS_EXT"]
    sources = [CSRC / "bindings.cpp"] + sorted((CSRC / "cpu").glob("*.cpp"))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("IDID_KERNELS_NO_CUDA"))
    common = dict(
        name="idid_kernels._C",
        include_dirs=[str(CSRC)],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        arch = os.environ.get("IDID_KERNELS_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "80;90"
        archs = [a.strip().replace(".", "").replace("+PTX", "")
                 for a in arch.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
        if not all(a.isdigit() for a in archs):
            raise SystemExit(f"idid_kernels: IDID_KERNELS_CUDA_ARCH / TORCH_CUDA_ARCH_LIST must list numeric "
                             f"architectures such as '80;90', got {arch!r}")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest architecture too, so newer GPUs can JIT-compile the kernels.
        newest = max(archs, key=int)
        gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
        sources += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
        ext = cpp_extension.CUDAExtension(
            sources=_rel(sources),
            extra_compile_args={"cxx": cxx + ["-DIDID_KERNELS_WITH_CUDA"],
                                "nvcc": opt + ["-DIDID_KERNELS_WITH_CUDA"] + gencode},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=_rel(sources), extra_compile_args={"cxx": cxx}, **common)
    print(f"idid_kernels: building {'CUDA' if with_cuda else 'CPU'} extension", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="idid_kernels",
    version="0.1.0",
    description="Fused kernels for imbalance-aware losses: IDID-R1 and contraction-mapped margin softmax",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["idid_kernels", "idid_kernels.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: pip would resolve it to the newest (CUDA) wheel. Install it first.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest>=7", "expecttest"],
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "matplotlib", "pytorch-metric-learning"],
        # `python -m idid_kernels train`: the bundled digits data set, and --plot.
        "train": ["scikit-learn", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["idid-kernels=idid_kernels.cli:main"]},
    zip_safe=False,
)
