"""deberta_fast: fused DeBERTa disentangled attention (Triton + CUDA C++).

The CUDA extension ``deberta_fast._C`` is built only where a CUDA build of
torch and nvcc are present.  Environment switches (as flash-attention's):

    DEBERTA_FAST_BUILD_CUDA=1   force the build (fails loudly if it cannot)
    DEBERTA_FAST_BUILD_CUDA=0   skip it (Triton and torch backends still work)
    DEBERTA_FAST_CUDA_ARCHS     e.g. "80;90a" (default: 80;90a)
    MAX_JOBS                    parallel nvcc jobs (default: RAM-aware)

Triton kernels live in the top-level ``kernels/`` folder and ship as the
private package ``deberta_fast._kernels`` (no top-level ``kernels`` package).
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc.build_config import cuda_extensions  # noqa: E402

ext_modules, cmdclass = cuda_extensions()

setup(
    name="deberta_fast",
    version="0.1.0",
    description="Fused DeBERTa disentangled attention kernels (Triton, CUDA C++) with an exact PyTorch reference",
    packages=["deberta_fast", "deberta_fast.backends", "deberta_fast._kernels", "deberta_fast._csrc"],
    # kernels/ and csrc/ ship inside deberta_fast (csrc sources for JIT builds of the extension)
    package_dir={"deberta_fast._kernels": "kernels", "deberta_fast._csrc": "csrc"},
    package_data={"deberta_fast._csrc": ["*.cu", "*.cuh", "*.cpp", "*.h", "sim/*.cpp", "sim/*.h", "sim/*.md"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    # README: pip install -e ".[hf,bench]" (main job + `pytest benchmarks/`).  On a CPU-only machine install
    # torch first from https://download.pytorch.org/whl/cpu, or pip pulls the CUDA build (~2.6 GB).
    extras_require={
        "hf": ["transformers>=4.40"],  # HF models, patch(), the main job's HF comparison (brings numpy)
        # numpy: the Triton interpreter (TRITON_INTERPRET=1) and the benchmark batches need it
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "transformers>=4.40"],
        "bench": ["pytest", "pytest-benchmark", "matplotlib", "numpy", "transformers>=4.40"],
        "peers": ["disentangled-flash", "flashdeberta", "einops"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
