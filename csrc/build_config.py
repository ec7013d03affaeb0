"""Decides whether and how ``setup.py`` builds the CUDA extension (importable without torch CUDA)."""
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _ram_aware_jobs() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_ram = max(1, int(pages / (4 << 30)))  # nvcc on these files peaks near 4 GiB
    except (ValueError, OSError, AttributeError):
        by_ram = 1
    return max(1, min(os.cpu_count() or 1, by_ram))


def should_build() -> tuple[bool, str]:
    flag = os.environ.get("DEBERTA_FAST_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False, "DEBERTA_FAST_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError(f"DEBERTA_FAST_BUILD_CUDA=1 but torch cannot be imported: {e}")
        return False, "torch not importable at build time"
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU build")
    if CUDA_HOME is None:
        reasons.append("nvcc / CUDA_HOME not found")
    if reasons and flag in ("1", "true", "yes", "on"):
        raise RuntimeError("DEBERTA_FAST_BUILD_CUDA=1 but " + ", ".join(reasons))
    return (not reasons), ", ".join(reasons)


HOST_TEST_STUBS = "dfa_host_stubs.cpp"
SIM_SOURCES = ("dfa_sim.cpp", "sim_fwd.cpp", "sim_bwd.cpp", "sim_selftest.cpp")  # in csrc/sim/

# Warnings that fail the CI builds (tests/test_cuda_compile.py, tests/test_cuda_host.py); GCC's
# -Winfinite-recursion is among them.  Torch's headers come in as system includes (-isystem).
WARNING_FLAGS = ["-Wall", "-Wextra", "-Werror"]


def nvcc_warning_flags() -> list[str]:
    """WARNING_FLAGS for nvcc: the host compiler's (-Xcompiler) and nvcc's own, device code included."""
    return ["-Xcompiler", ",".join(WARNING_FLAGS), "-Werror", "all-warnings"]


def cuda_sources() -> list[str]:
    """Translation units of deberta_fast._C: dfa_fwd.cu, dfa_bwd.cu (nvcc) and dfa_bindings.cpp (host)."""
    srcs = glob.glob(os.path.join(HERE, "*.cu")) + glob.glob(os.path.join(HERE, "*.cpp"))
    return sorted(s for s in srcs if os.path.basename(s) != HOST_TEST_STUBS)


def host_test_sources() -> list[str]:
    """The CPU host-test build (-DDFA_HOST_TEST): the same dfa_bindings.cpp with recording launcher stubs."""
    return [os.path.join(HERE, "dfa_bindings.cpp"), os.path.join(HERE, HOST_TEST_STUBS)]


def sim_sources() -> list[str]:
    """The CPU simulator build (-DDFA_CPU_SIM, csrc/sim/README.md): dfa_bindings.cpp, the kernels' own .cu files
    (through csrc/sim/sim_*.cpp) and the fiber scheduler, all by the host compiler."""
    sim = os.path.join(HERE, "sim")
    return [os.path.join(HERE, "dfa_bindings.cpp"), *(os.path.join(sim, f) for f in SIM_SOURCES)]


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include folder (the simulator uses its host fp16 / bf16 conversions), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


def sim_cflags() -> list[str]:
    """Host compiler flags of the simulator build: warnings as errors, -O2 (the fibers run the kernels'
    register tiles), the CUDA headers as system includes."""
    inc = cuda_include_dir()
    return ["-O2", "-DDFA_CPU_SIM", f"-std={cxx_std()}", *WARNING_FLAGS, "-Wno-unknown-pragmas",  # nvcc's unroll
            "-fno-strict-aliasing",  # the kernels read shared memory through uint32 / uint4 casts, as CUDA code does
            *(["-isystem", inc] if inc else [])]


def cxx_std() -> str:
    """C++ standard for the extension: torch >= 2.10 headers need C++20 (override: DEBERTA_FAST_CXX_STD)."""
    env = os.environ.get("DEBERTA_FAST_CXX_STD")
    if env:
        return env
    try:
        import torch

        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        return "c++20" if (major, minor) >= (2, 10) else "c++17"
    except Exception:  # noqa: BLE001
        return "c++17"


def cxx_flags() -> list[str]:
    """Host compiler flags of deberta_fast._C (dfa_bindings.cpp)."""
    return ["-O3", f"-std={cxx_std()}"]


def nvcc_flags(archs: str | None = None) -> list[str]:
    archs = archs or os.environ.get("DEBERTA_FAST_CUDA_ARCHS", "80;90a")
    flags = ["-O3", f"-std={cxx_std()}", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        if a:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def find_nvcc() -> str | None:
    """nvcc on PATH, else the usual install locations."""
    import shutil

    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def torch_system_includes() -> list[str]:
    """torch's and Python's headers as ``-isystem`` (their warnings are not ours)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    return [f for p in [*include_paths(), sysconfig.get_paths()["include"]] for f in ("-isystem", p)]


def nvcc_check_cmd(nvcc: str, name: str, arch: str, obj: str, keep_dir: str) -> list[str]:
    """The CPU compile check of one ``csrc/`` translation unit for one arch (``"80"``, ``"90a"``): the build's nvcc
    flags, warnings as errors (host and device), ``-Xptxas -v`` (registers / spills per kernel), PTX kept in
    ``keep_dir``.  Used by tests/test_cuda_compile.py and benchmarks/static_cuda.py."""
    return [nvcc, "-c", os.path.join(HERE, name), "-o", obj, f"-I{HERE}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Xptxas", "-v", "--keep", f"--keep-dir={keep_dir}", *nvcc_flags(arch), *nvcc_warning_flags(),
            *torch_system_includes()]


def cuda_extensions():
    ok, why = should_build()
    if not ok:
        print(f"deberta_fast: not building the CUDA extension ({why}); Triton/torch backends only.")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_ram_aware_jobs()))
    srcs = [os.path.relpath(s, os.path.dirname(HERE)) for s in cuda_sources()]
    if not srcs:
        return [], {}
    ext = CUDAExtension(
        name="deberta_fast._C",
        sources=srcs,
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension}
