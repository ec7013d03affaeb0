"""Test setup: without a GPU, Triton kernels run under the interpreter (set before triton is imported)."""
import os
import sys

if os.environ.get("DEBERTA_FAST_HIDE_TRITON") == "1":  # CI: the suite as it runs where triton is not installed
    sys.modules["triton"] = None  # `import triton` raises ImportError

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # decorate the kernels for the interpreter now: a test that sets TRITON_INTERPRET=0 for a while
    # must not be the first to import them
    try:
        import deberta_fast._kernels.triton_attention_launch  # noqa: F401
    except ImportError:  # triton not installed: the Triton tests skip or refuse with the reason
        pass


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` checks (nvcc builds, long interpreter runs) run in ``.ci/run``'s extended
    stage (``DEBERTA_FAST_SLOW=1``), not in the README's test command; ``gpu`` tests need a GPU.  The tests that
    wait for the simulator passes (``sim_passes``) run last: the passes run beside everything before them."""
    import sim_passes

    items.sort(key=lambda item: item.name in sim_passes.TESTS.values())  # (stable: the rest keep their order)
    _skip_gpu_tests_without_gpu(items)
    if os.environ.get("DEBERTA_FAST_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow check: runs in .ci/run's extended stage (DEBERTA_FAST_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the simulator passes of the collected ``tests/test_cuda_sim.py`` tests now (``sim_passes``), to run
    beside the rest of the suite; not where the simulator cannot build (no CUDA headers: those tests skip)."""
    import sim_passes

    names = {item.name for item in session.items if "skip" not in item.keywords}
    wanted = [p for p, test in sim_passes.TESTS.items() if test in names]
    if wanted and not session.config.option.collectonly:
        from deberta_fast import _cuda_ext

        if _cuda_ext._build_config().cuda_include_dir() is not None:
            for p in wanted:
                sim_passes.start(p)


def pytest_sessionfinish(session):
    import sim_passes

    sim_passes.stop_all()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_host_caches(monkeypatch):
    """Every test starts with empty call memo and plans (tests fake refusals, tables and configs: an
    earlier test's cached outcome must not answer for them)."""
    from deberta_fast import dispatch

    monkeypatch.setattr(dispatch, "_MEMO", {})
    launch = sys.modules.get("deberta_fast._kernels.triton_attention_launch")
    if launch is not None:
        monkeypatch.setattr(launch, "_FWD_PLANS", {})
        monkeypatch.setattr(launch, "_BWD_PLANS", {})
    yield


@pytest.fixture(autouse=True)
def _kernel_tests_on_gpu(request):
    """With a GPU, the Triton kernel tests make their tensors there (CPU runs use the interpreter)."""
    on_gpu = torch.cuda.is_available() and request.module.__name__.rsplit(".", 1)[-1].startswith("test_triton")
    if on_gpu:
        torch.set_default_device("cuda")
    yield
    if on_gpu:
        torch.set_default_device(None)  # ("cpu" would leave its torch function mode on for the tests after)


def _skip_gpu_tests_without_gpu(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def perturb_slot_table(monkeypatch):
    """``perturb(buckets, max_rel, L, distances, slot)``: from then on the slot table of that config at
    ``Lq = Lk = L`` (every device) has ``slot`` at ``distances``, as if the device's arithmetic had rounded those
    buckets differently from the CPU's.  The position caches are cleared before and after."""
    from deberta_fast import positions as P

    real = P._slot_table_of

    def clear():
        for f in P.shape_caches():
            f.cache_clear()
        try:
            from deberta_fast._kernels import triton_attention_launch as launch
            launch.clear_caches()  # layouts and forward plans hold slot tables
        except ImportError:
            pass

    def perturb(buckets, max_rel, L, distances, slot):
        def patched(q_len, k_len, pb, mrp, span, device_str):
            t = real(q_len, k_len, pb, mrp, span, device_str)
            if (pb, mrp) == (buckets, max_rel) and q_len == k_len == L:
                t = t.clone()
                t[torch.as_tensor(distances, device=t.device) + k_len - 1] = slot
            return t

        clear()
        monkeypatch.setattr(P, "_slot_table_of", patched)  # (what the tracing paths call)
        monkeypatch.setattr(P, "_slot_table_cached", P._shape_cache(patched))

    yield perturb
    clear()
