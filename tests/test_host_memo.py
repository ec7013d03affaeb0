"""The host path's caches: ``dispatch._MEMO`` (a call's validation and backend choice, per signature) and the
Triton launcher's ``_FWD_PLANS`` / ``_BWD_PLANS`` (a forward's or a backward's launches but for the tensors).  A
repeated signature must give the result a cold call gives, with new tensor values and new mask values; anything the
validation, the backend choice or the launch reads must be part of the signature.  Runs under the Triton interpreter
on CPU."""
import pytest
import torch

from deberta_fast import dispatch, disentangled_attention
from deberta_fast.backends import BACKENDS
from deberta_fast.dispatch import BackendUnavailableError

from triton_cases import BUCKETED, V3, assert_close_fp32, make_inputs, make_mask, reference_forward_lse

pytest.importorskip("triton")


@pytest.fixture
def launch():
    if BACKENDS["triton"].unavailable():
        pytest.skip(f"triton backend unavailable: {BACKENDS['triton'].unavailable()}")
    from deberta_fast._kernels import triton_attention_launch
    return triton_attention_launch


def _count_cold_work(launch, monkeypatch, build: str):
    """Empty caches; ``(built, prepared)``: lists that grow by one per call of ``dispatch.<build>`` (validation) and
    of the launcher's ``_prepare`` (a launch prepared from scratch)."""
    monkeypatch.setattr(dispatch, "_MEMO", {})
    monkeypatch.setattr(launch, "_FWD_PLANS", {})
    monkeypatch.setattr(launch, "_BWD_PLANS", {})
    built, prepared = [], []
    real_build, real_prepare = getattr(dispatch, build), launch._prepare
    monkeypatch.setattr(dispatch, build, lambda *a, **k: built.append(1) or real_build(*a, **k))
    monkeypatch.setattr(launch, "_prepare", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    return built, prepared


def _fresh(q, k, v, pk, pq):
    """New random values, same shapes / strides / dtypes."""
    return [None if t is None else torch.randn_like(t) for t in (q, k, v, pk, pq)]


def _checked(ts, mask, kw, rows=None):
    """The triton call's output, checked against the float64 reference (position tables cut to ``rows``)."""
    out = disentangled_attention(*ts, attention_mask=mask, backend="triton", **kw)
    cut = [t if rows is None or t is None else t[..., :rows, :] for t in ts[3:]]
    ref, _ = reference_forward_lse(*ts[:3], *cut, mask, kw, torch.float64)
    assert_close_fp32(out, ref, what="out")
    return out


@pytest.mark.parametrize("mask", ["none", "key", "full", "full_h1"])
def test_repeated_signature_skips_validation_and_stays_exact(launch, monkeypatch, mask):
    """The second and third calls of a signature neither validate nor prepare a launch again; each is exact with
    its own tensor and mask values (which the memo and the plan must not keep)."""
    q, k, v, pk, pq, m, kw = make_inputs(2, 3, 21, 21, 16, buckets=V3, mask=mask)
    built, prepared = _count_cold_work(launch, monkeypatch, "build_call")
    first = _checked((q, k, v, pk, pq), m, kw)
    for _ in range(2):
        _checked(_fresh(q, k, v, pk, pq), make_mask(mask, 2, 3, 21, 21), kw)
    assert built == [1] and prepared == [1]
    # the cached path against a cold one: bitwise
    again = disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", **kw)
    monkeypatch.setattr(dispatch, "_MEMO", {})
    monkeypatch.setattr(launch, "_FWD_PLANS", {})
    cold = disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", **kw)
    assert torch.equal(first, again) and torch.equal(again, cold)


@pytest.mark.parametrize("mask", ["key", "full"])
def test_backward_prepared_once_and_exact(launch, monkeypatch, mask):
    """Forward + backward three times with one signature (new values and masks each time): one preparation per
    pass, and all five gradients exact each time; with dropout, the cached backward against a cold one: bitwise."""
    from triton_cases import grads, reference_fn, triton_fn

    _, prepared = _count_cold_work(launch, monkeypatch, "build_call")
    q, k, v, pk, pq, _, kw = make_inputs(2, 3, 21, 21, 16, buckets=V3)
    do = torch.randn(2, 3, 21, 16)
    for _ in range(3):
        ts, m = _fresh(q, k, v, pk, pq), make_mask(mask, 2, 3, 21, 21)
        got = grads(triton_fn(m, kw), ts, torch.float32, do)
        ref = grads(reference_fn(m, kw), ts, torch.float64, do)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
            assert_close_fp32(a, b, tol=2e-5, what=name)
    assert prepared == [1, 1] and len(launch._BWD_PLANS) == 1
    plan, = launch._BWD_PLANS.values()
    assert plan.pr.mask_args is None and plan.pr.run_rows is not None  # the backward's own layout, no mask operand
    torch.manual_seed(7)  # the dropout seed (deberta_fast draws it from torch's generator)
    cold = grads(triton_fn(m, kw, dropout_p=0.2), ts, torch.float32, do)  # a signature of its own: prepared
    torch.manual_seed(7)
    cached = grads(triton_fn(m, kw, dropout_p=0.2), ts, torch.float32, do)
    assert prepared == [1, 1, 1, 1] and len(launch._BWD_PLANS) == 2
    assert all(torch.equal(a, b) for a, b in zip(cached, cold))


def test_signature_tells_masks_strides_and_table_rows_apart(launch, monkeypatch):
    """Same q / k / v shapes under a key mask, then full masks, then no mask; then a strided (transposed) view;
    then position tables longer than 2 * span (cut as HF does) - each exact."""
    monkeypatch.setattr(dispatch, "_MEMO", {})
    monkeypatch.setattr(launch, "_FWD_PLANS", {})
    q, k, v, pk, pq, _, kw = make_inputs(2, 2, 19, 19, 16, buckets=BUCKETED)
    for kind in ("key", "full_h1", "full", "none", "key"):  # full_h1: uniform rows [B, 1, Lq], as the key mask
        _checked(_fresh(q, k, v, pk, pq), make_mask(kind, 2, 2, 19, 19), kw)
    qt = torch.randn(2, 19, 2, 16).transpose(1, 2)  # [B, H, L, D] with other strides
    _checked((qt, *_fresh(q, k, v, pk, pq)[1:]), make_mask("key", 2, 2, 19, 19), kw)
    long_pk, long_pq = torch.randn(2, 2 * 4 + 6, 16), torch.randn(2, 2 * 4 + 6, 16)
    for _ in range(2):
        _checked((*_fresh(q, k, v, None, None)[:3], long_pk, long_pq), None, kw, rows=2 * 4)
        long_pk, long_pq = torch.randn_like(long_pk), torch.randn_like(long_pq)
    assert len(launch._FWD_PLANS) == 6 and len(dispatch._MEMO) == 6


def test_memo_reads_the_environment(launch, monkeypatch):
    """An identical call after ``TRITON_INTERPRET`` is unset is refused again on CPU (the memo keys on it)."""
    if torch.cuda.is_available():
        pytest.skip("the refusal without TRITON_INTERPRET is a CPU one")
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 17, 17, 16, mask="key")
    disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", **kw)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", **kw)


def test_fast_getenv_is_os_environ(monkeypatch):
    """``_env.getenv`` (the memo's and the launcher's environment reads) sees what ``os.environ`` holds, as set and
    unset, and ``env_flag`` reads flags as triton does."""
    import os

    from deberta_fast._env import env_flag, getenv

    name = "DEBERTA_FAST_TEST_VARIABLE"
    assert getenv(name) is None and getenv(name, "x") == "x" and not env_flag(name)
    for value, flag in (("1", True), ("TRUE", True), ("on", True), ("Yes", True), ("0", False), ("", False),
                        ("off", False), (" 1", False), ("h\u00e9", False)):
        monkeypatch.setenv(name, value)
        assert getenv(name) == os.environ[name] == value and env_flag(name) is flag, value
    monkeypatch.delenv(name)
    assert getenv(name) is None and not env_flag(name)


def test_auto_fallback_is_memoised_and_warns_once(launch, monkeypatch):
    """``auto`` on CPU refuses cuda and warns that it picked the interpreter; the choice is memoised: the next
    call of the signature is neither validated nor warned about again, and is served by the same backend."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter fallback is a CPU one")
    import warnings

    from deberta_fast import last_backend

    built, _ = _count_cold_work(launch, monkeypatch, "build_call")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 17, 17, 16, mask="key")
    with pytest.warns(RuntimeWarning, match="CPU interpreter"):
        disentangled_attention(q, k, v, pk, pq, attention_mask=m, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        disentangled_attention(*_fresh(q, k, v, pk, pq), attention_mask=m, **kw)
    assert built == [1] and last_backend() == "triton"


def test_caches_keep_no_user_tensor(launch):
    """After padded and packed calls (forward and backward), neither the memo nor the plans keep an input (or mask)
    alive."""
    import gc
    import weakref

    from deberta_fast import disentangled_attention_varlen

    q, k, v, pk, pq, m, kw = make_inputs(2, 2, 19, 19, 16, mask="full_h1")
    qp, kp, vp = torch.randn(30, 2, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    cu = torch.tensor([0, 19, 30], dtype=torch.int32)
    [t.requires_grad_() for t in (q, k, v, pk, pq, qp, kp, vp)]  # (a loop variable would keep one alive)
    for _ in range(2):  # forward and backward
        disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", **kw).sum().backward()
        disentangled_attention_varlen(qp, kp, vp, pk, pq, cu, cu, 19, 19, backend="triton", **kw).sum().backward()
    refs = [weakref.ref(t) for t in (q, k, v, pk, pq, m, qp, kp, vp, cu)]
    del q, k, v, pk, pq, m, qp, kp, vp, cu
    gc.collect()
    assert dispatch._MEMO and launch._FWD_PLANS and launch._BWD_PLANS and all(r() is None for r in refs)
    plans = [*launch._FWD_PLANS.values(), *launch._BWD_PLANS.values()]
    # nor a call's mask operands (a plan without masks keeps the launcher's own placeholders)
    assert all(plan.pr.mask_args is None or all(any(t is d for d in launch._dummies(t.device))
                                                for t in plan.pr.mask_args) for plan in plans)
    assert any(plan.pr.mask_args is None for plan in plans)  # (the padded plans, with their masks)


def test_plan_with_head_groups_and_per_head_masks(launch, monkeypatch):
    """A plan of several head groups (a tiny ``TABLE_BUDGET``: one head per group) with a per-head full mask that
    changes between calls: exact each time, prepared once."""
    monkeypatch.setattr(launch, "TABLE_BUDGET", 1)
    _, prepared = _count_cold_work(launch, monkeypatch, "build_call")
    q, k, v, pk, pq, _, kw = make_inputs(2, 3, 23, 23, 16, buckets=V3)
    for _ in range(3):
        _checked(_fresh(q, k, v, pk, pq), make_mask("full", 2, 3, 23, 23), kw)
    plan, = launch._FWD_PLANS.values()
    assert len(plan.groups) == 3 and prepared == [1]


def test_replaced_launch_config_is_read_on_every_call(launch, monkeypatch):
    """While ``launch_config`` is replaced (the tuning and static-profile tools record or force configs through
    it) no plan is cached: the replacement sees every call."""
    monkeypatch.setattr(launch, "_FWD_PLANS", {})
    seen = []
    real = launch.launch_config
    monkeypatch.setattr(launch, "launch_config", lambda p, *a, **k: seen.append(p) or real(p, *a, **k))
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 17, 17, 16, mask="key")
    for _ in range(3):
        _checked(_fresh(q, k, v, pk, pq), m, kw)
    assert seen == ["fwd"] * 3 and launch._FWD_PLANS == {}
    seen.clear()
    out = disentangled_attention(*[t.requires_grad_() for t in _fresh(q, k, v, pk, pq)], attention_mask=m,
                                 backend="triton", **kw)
    for _ in range(2):
        out.sum().backward(retain_graph=True)
    assert seen == ["fwd", "bwd", "bwd"] and launch._BWD_PLANS == {}


def _packed_reference(q, k, v, pk, pq, offsets, kw):
    """Every sequence alone through the float64 reference, packed back: ``[T, H, D]``."""
    outs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        outs.append(reference_forward_lse(*seq, pk, pq, None, kw, torch.float64)[0][0].transpose(0, 1))
    return torch.cat(outs)


def test_packed_repeated_signature_stays_exact_and_checks_offsets(launch, monkeypatch):
    """Packed calls of one signature (token counts, longest sequence) with other offsets each time: exact; the
    second and third neither validate nor prepare again, yet still check their offsets (``check_offsets``): bad
    ones are refused as on a cold call."""
    from deberta_fast import disentangled_attention_varlen

    built, prepared = _count_cold_work(launch, monkeypatch, "build_varlen_call")
    H, D, kw = 2, 16, dict(position_buckets=V3[0], max_relative_positions=V3[1])
    pk, pq = torch.randn(H, 2 * V3[0], D), torch.randn(H, 2 * V3[0], D)
    for offsets in ([0, 13, 40, 45], [0, 27, 32, 45], [0, 5, 18, 45]):  # 45 tokens, longest 27
        q, k, v = torch.randn(45, H, D), torch.randn(45, H, D), torch.randn(45, H, D)
        cu = torch.tensor(offsets, dtype=torch.int32)
        out = disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 27, 27, backend="triton", **kw)
        assert_close_fp32(out, _packed_reference(q, k, v, pk, pq, offsets, kw), what="packed out")
    cu = torch.tensor([0, 20, 22, 45], dtype=torch.int32)  # as the patched encoder calls it: offsets unchecked
    out = disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 27, 27, backend="triton", check_offsets=False, **kw)
    assert_close_fp32(out, _packed_reference(q, k, v, pk, pq, [0, 20, 22, 45], kw), what="packed out")
    assert built == [1] and prepared == [1]
    cu = torch.tensor([0, 5, 10, 45], dtype=torch.int32)  # the same tokens, longest 35: a layout of its own
    out = disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 35, 35, backend="triton", **kw)
    assert_close_fp32(out, _packed_reference(q, k, v, pk, pq, [0, 5, 10, 45], kw), what="packed out")
    for bad in ([0, 30, 40, 45], [1, 13, 40, 45], [0, 20, 10, 45]):  # too long, not from 0, decreasing
        cu = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match="invalid offsets"):
            disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 27, 27, backend="triton", **kw)
