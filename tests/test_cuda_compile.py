"""Every CUDA translation unit of ``csrc/`` compiles with nvcc for sm_80 and sm_90a (no GPU needed),
the objects hold tensor-core MMA code for that arch, and the C++ bindings compile against the
installed torch headers.  Every build is warning-clean: ``-Wall -Wextra -Werror`` for the host
compiler (GCC's ``-Winfinite-recursion`` among them) and ``-Werror all-warnings`` for nvcc, device
code included; torch's headers are system includes (``-isystem``).  Skipped only when nvcc (or, for the
bindings, a host compiler) is absent.  ``MAX_JOBS`` caps the parallel compiles."""
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # nvcc: minutes per arch per file on 2 cores (.ci/run's extended stage)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT))
from csrc import build_config  # noqa: E402

ARCHS = ("80", "90a")
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))


NVCC = build_config.find_nvcc()
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _cuda_include():
    if NVCC is None:
        return None
    inc = Path(os.path.realpath(NVCC)).parent.parent / "include"
    for d in (inc, Path("/usr/local/cuda/include")):
        if (d / "cuda_runtime_api.h").exists():
            return d
    return None


def _jobs():
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 4 << 30
    return max(1, min(os.cpu_count() or 1, int(ram // (3 << 30)), 4))


def _compile_cu(name, arch, outdir):
    obj = outdir / f"{name}.sm_{arch}.o"
    keep = outdir / f"keep_{name}_{arch}"
    keep.mkdir()
    # -Xptxas -v: register / spill report (spills are reported, not failed: see `builds`)
    cmd = build_config.nvcc_check_cmd(NVCC, name, arch, str(obj), str(keep))
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    ptx = "".join(p.read_text(errors="replace") for p in keep.glob("*.ptx"))
    return {"rc": r.returncode, "log": r.stdout + r.stderr, "secs": time.time() - t0, "obj": obj, "cmd": cmd,
            "ptx": ptx}


def _compile_bindings(outdir):
    obj = outdir / "dfa_bindings.o"
    cmd = [CXX, "-c", str(CSRC / "dfa_bindings.cpp"), "-o", str(obj), "-fPIC", *build_config.cxx_flags(),
           *build_config.WARNING_FLAGS, f"-I{CSRC}", "-isystem", str(_cuda_include()),
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *build_config.torch_system_includes()]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return {"rc": r.returncode, "log": r.stdout + r.stderr, "secs": time.time() - t0, "obj": obj, "cmd": cmd}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """All compiles at once, RAM-aware parallel (nvcc peaks near 1-2 GiB on these files)."""
    if NVCC is None:
        pytest.skip("nvcc not found: cannot check that the CUDA sources compile")
    out = tmp_path_factory.mktemp("cuda_objs")
    jobs = {}
    with cf.ThreadPoolExecutor(_jobs()) as ex:
        # longest first
        for name in sorted(CU_FILES, key=lambda n: n != "dfa_bwd.cu"):
            for arch in ARCHS:
                jobs[(name, arch)] = ex.submit(_compile_cu, name, arch, out)
        if CXX and _cuda_include():
            jobs[("dfa_bindings.cpp", "host")] = ex.submit(_compile_bindings, out)
        res = {k: f.result() for k, f in jobs.items()}
    report = ", ".join(f"{n}[{a}] {r['secs']:.1f}s" for (n, a), r in res.items())
    print(f"\ncompile times: {report}")
    spills = [s for (n, a), r in res.items() for s in _spills(r["log"], f"{n}[{a}]")]
    if spills:
        print("register spills (ptxas -v; reported, not failed):\n  " + "\n  ".join(spills))
    return res


def _spills(log, where):
    """ptxas -v lines with spills, each with its kernel: 'Function properties for K' precedes them."""
    out, fn = [], "?"
    for ln in log.splitlines():
        if "Function properties for" in ln:
            fn = ln.rsplit(" ", 1)[-1]
        elif "spill" in ln and " 0 bytes spill stores" not in ln:
            out.append(f"{where} {fn}: {ln.strip()}")
    return out


def test_sources_exist():
    assert set(CU_FILES) == {"dfa_fwd.cu", "dfa_bwd.cu"}, CU_FILES
    srcs = {Path(s).name for s in build_config.cuda_sources()}
    assert srcs == {"dfa_fwd.cu", "dfa_bwd.cu", "dfa_bindings.cpp"}, srcs  # not the host-test stubs
    assert {Path(s).name for s in build_config.host_test_sources()} == {"dfa_bindings.cpp", "dfa_host_stubs.cpp"}


def test_ci_builds_fail_on_warnings():
    assert {"-Wall", "-Wextra", "-Werror"} <= set(build_config.WARNING_FLAGS)
    nv = build_config.nvcc_warning_flags()
    assert "-Werror" in nv and "all-warnings" in nv and any("-Werror" in f and "-Wall" in f for f in nv)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles(builds, name, arch):
    r = builds[(name, arch)]
    assert r["rc"] == 0, f"nvcc failed for {name} sm_{arch}:\n{' '.join(r['cmd'])}\n{r['log'][-6000:]}"
    assert r["obj"].stat().st_size > 0
    assert "error" not in r["log"].lower() and "warning" not in r["log"].lower(), r["log"][-3000:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_objects_use_tensor_cores(builds, name, arch):
    r = builds[(name, arch)]
    if r["rc"] != 0:
        pytest.fail(f"{name} sm_{arch} did not compile")
    ptx = r["ptx"]
    assert f".target sm_{arch}" in ptx, "no PTX for the requested arch was generated"
    for ty in ("f16", "bf16"):
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32" in ptx, f"no {ty} tensor-core MMA"
    for dim in (32, 64, 128):  # (the forward's third argument: its wgmma variant, dfa_fwd.cu's WG)
        assert re.search(rf"Li{dim}E(Lb[01]E)*EEvNS_6ParamsE", ptx), f"head_dim {dim} kernels missing"
    # the wgmma variants (WG): their instructions on sm_90a (n = the score tiles' keys / queries, and D for the
    # products into the output / gradients), a trap elsewhere
    for ty in ("f16", "bf16"):
        for n in (32, 64, 128):
            assert (f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty}" in ptx) == (arch == "90a"), (ty, n)
    cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).parent / "cuobjdump")
    if os.path.exists(cuobjdump):  # SASS check where the tool exists
        sass = subprocess.run([cuobjdump, "-sass", str(r["obj"])], capture_output=True, text=True)
        assert sass.returncode == 0, sass.stderr
        assert "HMMA.16816.F32" in sass.stdout, "no m16n8k16 tensor-core MMA in the SASS"


def test_bindings_compile(builds):
    key = ("dfa_bindings.cpp", "host")
    if key not in builds:
        pytest.skip("no host C++ compiler or CUDA headers (cuda_runtime_api.h) found")
    r = builds[key]
    assert r["rc"] == 0, f"host compile of the bindings failed:\n{' '.join(r['cmd'])}\n{r['log'][-6000:]}"
    nm = shutil.which("nm")
    if nm:  # the padded and the packed varlen entry points are both compiled in
        syms = subprocess.run([nm, "-C", str(r["obj"])], capture_output=True, text=True).stdout
        for fn in ("fwd(", "bwd(", "varlen_fwd(", "varlen_bwd(", "make_varlen("):
            assert fn in syms, f"{fn[:-1]} missing from the bindings object"


def test_nvcc_flags():
    flags = build_config.nvcc_flags("80;90a")
    assert "arch=compute_90a,code=sm_90a" in flags and "arch=compute_80,code=sm_80" in flags
    assert any(f.startswith("-std=c++") for f in flags)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_profile_reads_the_objects(builds, arch):
    """``benchmarks.static_cuda`` on the objects built above: every attention kernel instantiation (fwd, dq,
    dK/dV x fp16/bf16 x head dims) with its registers, spills, MMA kind and a main loop it can count."""
    from benchmarks import static_cuda

    rows = []
    for name in CU_FILES:
        r = builds[(name, arch)]
        if r["rc"] != 0:
            pytest.fail(f"{name} sm_{arch} did not compile")
        rows += static_cuda.analyse(str(r["obj"]), r["log"], arch)
    kinds = {(r["kernel"], r["dtype"], r["D"]) for r in rows}
    plain = ("dfa_fwd_kernel", "dfa_bwd_dq_kernel", "dfa_bwd_dkdv_kernel")
    # (sm_80: the host never launches them; the forward's serial variant: DEBERTA_FAST_CUDA_WGMMA=serial)
    wg = (*(f"{k} (wgmma)" for k in plain), "dfa_fwd_kernel (wgmma serial)") if arch == "90a" else ()
    for k in (*plain, *wg):
        assert {(k, dt, d) for dt in ("fp16", "bf16") for d in (32, 64, 128)} <= kinds, sorted(kinds)
    assert not any("wgmma" in k for k, _, _ in kinds) or wg, sorted(kinds)
    for r in rows:
        mma = "wgmma (HGMMA)" if "(wgmma" in r["kernel"] else "mma.sync (HMMA)"
        assert r["regs"] and r["spill_stores"] is not None and r["mma"] == mma, r
        assert not r.get("wgmma_serialized"), r  # ptxas waits after each wgmma (C7514)
        assert r["loops"] and all(lp["per_element_longest"] >= lp["per_element_shortest"] > 0 for lp in r["loops"]), r
    assert "| dfa_bwd_dkdv_kernel |" in static_cuda.table({"date": "d", "nvcc": "v", "kernels": rows})
