"""Build script for idid_kernels and its C++/CUDA extension ``idid_kernels._C``.

Metadata and build requirements are in ``pyproject.toml``; this file only describes the extension.
Install (torch must already be installed; the build imports it):

    pip install --no-build-isolation -e ".[test]"

torch is deliberately not a build requirement: an isolated build environment would download the
newest CUDA build of torch instead of compiling against the installed one. A build that cannot
import torch (``pip install .`` with build isolation, or no torch installed) stops with a message
saying what to do, instead of silently installing a package without its kernels.

Environment switches (read at build time):

    IDID_KERNELS_NO_EXT=1     build no extension: a pure-Python install on the reference backend
    IDID_KERNELS_NO_CUDA=1    build the CPU extension even when torch has CUDA and nvcc is found
    IDID_KERNELS_NO_CUDA_EMULATOR=1
                              leave the CUDA-execution emulator out of the CPU build (by default the
                              CPU build also compiles csrc/cuda/*.cu as host C++ against csrc/emu, so
                              IDID_KERNELS_CUDA_EMULATE=1 runs those kernels on CPU tensors)
    IDID_KERNELS_CUDA_ARCH    nvcc architectures, e.g. "80;90" (default: TORCH_CUDA_ARCH_LIST or "80;90")
    IDID_KERNELS_DEBUG=1      -O0 -g builds
    MAX_JOBS                  parallel compile jobs for ninja (torch.utils.cpp_extension reads it)
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


_NO_TORCH = """
idid_kernels: cannot build the C++ extension: torch is not importable in the build environment
({error}; build interpreter {python}).

The extension is compiled against the torch you run with, so torch must be installed first and
the build must see it:

    pip install torch==2.13.0            # or your CUDA build of torch
    pip install --no-build-isolation -e ".[test]"

`pip install .` without --no-build-isolation builds in a fresh environment that has no torch.
For a pure-Python install (reference backend only, no fused kernels) set IDID_KERNELS_NO_EXT=1.
"""


def _emulated_cuda_sources():
    """csrc/cuda/*.cu with their <<<>>> launches rewritten for the emulator (build/cuda_emu/*.cu.cpp,
    rewritten only when they change), the emulator's scheduler, and the CUDA bindings."""
    spec = importlib.util.spec_from_file_location("_idid_launch_rewrite", CSRC / "emu" / "launch_rewrite.py")
    rewrite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewrite)
    generated = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        out = ROOT / "build" / "cuda_emu" / f"{cu.stem}.cu.cpp"
        rewrite.rewrite_file(cu.relative_to(ROOT), out)
        generated.append(out)
    return generated + [CSRC / "emu" / "idid_emu.cpp"] + sorted((CSRC / "cuda").glob("*_binding.cpp"))


def _extensions():
    if _flag("IDID_KERNELS_NO_EXT"):
        print("idid_kernels: IDID_KERNELS_NO_EXT set, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(_NO_TORCH.format(error=f"{type(exc).__name__}: {exc}", python=sys.executable)) from None

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
        emulator = not _flag("IDID_KERNELS_NO_CUDA_EMULATOR")
        if emulator:
            sources += _emulated_cuda_sources()
            cxx += ["-DIDID_KERNELS_CUDA_EMULATOR", "-Wno-unknown-pragmas"]  # #pragma unroll in .cu
            # The emulator's cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and cub first; csrc/cuda for the
            # rewritten sources' quoted includes.
            common["include_dirs"] = [str(CSRC / "emu" / "include"), str(CSRC / "cuda"), str(CSRC)]
        ext = cpp_extension.CppExtension(sources=_rel(sources), extra_compile_args={"cxx": cxx}, **common)
        with_cuda = False
    kind = "CUDA" if with_cuda else ("CPU (with the CUDA emulator)" if not _flag("IDID_KERNELS_NO_CUDA_EMULATOR")
                                     else "CPU")
    print(f"idid_kernels: building {kind} extension", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Everything else (name, version, packages, dependencies, extras, entry points) is in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
