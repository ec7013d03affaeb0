"""The CUDA kernels run on CPU: ``csrc/*.cu`` built by the host compiler with the simulator of ``csrc/sim/``
(``DEBERTA_FAST_CUDA_SIM=1``; each CUDA thread a fiber, warp collectives and barriers modelled).

* the simulator's self-tests: faulty kernels it must catch (a missing barrier, a shuffle in divergent code, a
  barrier after an exit, launch limits, a misaligned ldmatrix) and the collectives (shuffles, mma.sync,
  ldmatrix) against known values;
* the GPU tests of the cuda backend (``tests/test_cuda_backend.py``, ``tests/test_cuda_varlen.py``, marked
  ``cuda_sim`` under the simulator) run in a subprocess on CPU tensors: a crash in a kernel fails the test
  instead of killing pytest.

A correctness tool, not a GPU: it cannot show timing, races inside one barrier interval or the hardware's
own rounding order; the kernels stay unvalidated on a GPU until they run on one."""
import pytest
import torch

from deberta_fast import _cuda_ext


@pytest.fixture(scope="module")
def sim():
    cfg = _cuda_ext._build_config()
    if cfg.cuda_include_dir() is None:
        pytest.skip("the CUDA toolkit's headers (cuda_fp16.h) are not installed: the simulator needs them")
    return _cuda_ext.simulator()


@pytest.mark.parametrize("name,error", [
    ("divergent_shuffle", "64 at a warp collective"),
    ("divergent_syncwarp", "at a warp collective"),
    ("barrier_after_exit", "127 threads wait at __syncthreads, 0 at a warp collective, 1 exited"),
    ("smem_over_default", "65536 bytes of dynamic shared memory, 49152 allowed"),
    ("smem_over_optin", "204800 bytes of dynamic shared memory exceed the 166912"),
    ("grid_y_over_limit", "grid (1, 65536, 1)"),
    ("ldmatrix_misaligned", "ldmatrix row address at shared offset 2 (16 bytes) outside the 1024 bytes of dynamic "
                            "shared memory or not 16-byte aligned"),
])
def test_simulator_reports_faults(sim, name, error):
    err, _ = sim.sim_selftest(name)
    assert error in err


def test_simulator_shows_a_missing_barrier(sim):
    """Thread t reads what thread t + 32 wrote: right with the barrier; without it the fibers of the first warp
    run ahead and read the launch's 0xFF fill (NaN)."""
    err, out = sim.sim_selftest("neighbour")
    assert err == "" and out[:128] == [float((t + 32) % 128) for t in range(128)]
    err, out = sim.sim_selftest("neighbour_no_barrier")
    assert err == "" and all(x != x for x in out[:96])  # warps 0-2 read before warps 1-3 wrote


def test_simulator_dry_run(sim):
    """``sim_dry_run(True)`` (the host-path benchmark's stubbed launches): a launch checks its configuration as always
    and runs no block, so the output keeps its initial -1; off again, the kernel runs."""
    prev = sim.sim_dry_run(True)
    try:
        assert prev is False
        err, out = sim.sim_selftest("neighbour")
        assert err == "" and out[:128] == [-1.0] * 128
        err, _ = sim.sim_selftest("smem_over_default")
        assert "65536 bytes of dynamic shared memory, 49152 allowed" in err
    finally:
        assert sim.sim_dry_run(prev) is True
    err, out = sim.sim_selftest("neighbour")
    assert err == "" and out[:128] == [float((t + 32) % 128) for t in range(128)]


def test_simulator_collectives(sim):
    """Quad sums by __shfl_xor_sync, an indexed __shfl_sync, __any_sync and one mma.sync m16n8k16 (fragments as in
    the PTX ISA) on known matrices."""
    err, out = sim.sim_selftest("collectives")
    assert err == ""
    out = torch.tensor(out).view(32, 6)
    lane = torch.arange(32)
    assert torch.equal(out[:, 0], (4 * (lane // 4) * 4 + 6).float())
    r, k, n = torch.arange(16.)[:, None], torch.arange(16.)[None, :], torch.arange(8.)[None, :]
    A = (r + k / 16).half().double()
    B = (torch.arange(16.)[:, None] - n).half().double()
    D = A @ B
    g, t = lane // 4, lane % 4
    want = torch.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], 1).float()
    assert torch.equal(out[:, 1:5], want)
    assert torch.equal(out[:, 5], (10 * ((7 * lane) % 32) + 1000).float())  # __any_sync: one lane / none


def test_simulator_ldmatrix(sim):
    """ldmatrix.x4 and .x4.trans on four known 8x8 matrices (value 1000 m + 10 row + col): lane l gets, per matrix,
    the pair (row l/4, columns 2(l%4), 2(l%4)+1), of the transpose with .trans (PTX ISA)."""
    err, out = sim.sim_selftest("ldmatrix")
    assert err == ""
    out = torch.tensor(out).view(2, 32, 4, 2)
    lane, m, h = torch.arange(32)[:, None, None], torch.arange(4)[None, :, None], torch.arange(2)[None, None, :]
    g, c = lane // 4, 2 * (lane % 4) + h
    assert torch.equal(out[0], (1000 * m + 10 * g + c).float())
    assert torch.equal(out[1], (1000 * m + 10 * c + g).float())


def test_simulator_wgmma(sim):
    """wgmma m64n32k16 on known matrices through the PTX ISA's canonical no-swizzle layouts: A from shared memory
    (K-major) with B K-major, and A from registers (mma.sync's A fragments) with B MN-major; thread t of warp w holds
    rows 16 w + t/4 (+ 8) and columns 8 i + 2 (t % 4) (+ 1): mma.sync's C fragments over the n-tiles.  Reading the
    accumulators before the wait sees NaN; a thread that never waits is reported, and so are operands (shared memory,
    A registers) changed between the issue and the wait."""
    err, out = sim.sim_selftest("wgmma")
    assert err == ""
    m, k, n = torch.arange(64.)[:, None], torch.arange(16.), torch.arange(32.)
    A = (m / 8 + k[None, :] / 16).half().double()
    B = ((k[:, None] - n[None, :]) / 8).half().double()
    D = (A @ B).float()
    tid = torch.arange(128)[:, None]
    i = torch.arange(16)[None, :]
    rows = 16 * (tid // 32) + (tid % 32) // 4 + 8 * ((i // 2) % 2)
    cols = 8 * (i // 4) + 2 * (tid % 4) + i % 2
    want = D[rows, cols]
    out = torch.tensor(out).view(128, 2, 16)
    assert torch.equal(out[:, 0], want) and torch.equal(out[:, 1], want)
    err, out = sim.sim_selftest("wgmma_read_early")
    assert err == "" and all(x != x for x in out[0::32])
    err, _ = sim.sim_selftest("wgmma_no_wait")
    assert "exits with wgmma results never waited for" in err
    # the hardware reads the operands asynchronously: shared memory or A registers changed before the wait
    err, _ = sim.sim_selftest("wgmma_smem_race")
    assert "shared memory read by a pending wgmma (B) changed before its wait_group" in err
    err, _ = sim.sim_selftest("wgmma_reg_race")
    assert "A registers of a pending wgmma written before its wait_group" in err


def _gpu_tests(name: str) -> str:
    """The summary line of simulator pass ``name`` (``sim_passes``: started when collection ended)."""
    import sim_passes

    rc, out = sim_passes.result(name)
    assert rc == 0, f"exit {rc} (negative: killed by a signal):\n{out[-6000:]}"
    return out.strip().splitlines()[-1]


def test_cuda_backend_gpu_tests_in_simulator(sim):
    """Every GPU test of the cuda backend (padded and packed, fp16 / bf16, D = 32 / 64 / 128, every relative
    term, bucket configs, masks, uniform rows, dropout against the Philox reference, rows without keys) on CPU."""
    summary = _gpu_tests("mma.sync")
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 100 and "failed" not in summary, summary


def test_cuda_backend_wgmma_in_simulator(sim):
    """The kernels' wgmma variants (``DEBERTA_FAST_CUDA_WGMMA=1``: the forward's and the backward score kernels'
    products on wgmma, the tiles in the core-matrix layout) on the GPU tests of ``WGMMA_TESTS`` (each asserts that the
    wgmma kernels ran: tests/cuda_checks.py)."""
    summary = _gpu_tests("wgmma")
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 60 and "failed" not in summary, summary
