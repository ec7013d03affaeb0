"""The Triton launcher's head groups (``TABLE_BUDGET``): a call whose relative tables exceed the budget runs its
heads in groups, one launch per group.  The same values as one launch (up to the float32 rounding of the table GEMMs,
whose summation order may change with the batch of heads; a different dropout keep-mask would differ by O(1)),
padded and packed, every mask kind, 3-D and 4-D position tables; and the groups really happen (launches counted).
Interpreter on CPU (tests/conftest.py)."""
import pytest
import torch

from deberta_fast import disentangled_attention, disentangled_attention_varlen

from triton_cases import V3, cast, make_inputs

pytest.importorskip("triton")
launch = pytest.importorskip("deberta_fast._kernels.triton_attention_launch")


def test_head_groups(monkeypatch):
    monkeypatch.setattr(launch, "TABLE_BUDGET", 100)
    assert launch.head_groups(5, 20) == [slice(0, 5)]  # within the budget: one group
    assert launch.head_groups(5, 40) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert launch.head_groups(12, 34) == [slice(h, h + 2) for h in range(0, 12, 2)]
    assert launch.head_groups(4, 1000) == [slice(h, h + 1) for h in range(4)]  # one head over budget: one each
    assert launch.head_groups(7, 30) == [slice(0, 3), slice(3, 6), slice(6, 7)]  # fewest groups (3 of <= 3)
    for H in range(1, 20):
        for per_head in (1, 7, 33, 50, 101, 400):
            groups = launch.head_groups(H, per_head)
            assert [h for g in groups for h in range(g.start, g.stop)] == list(range(H))
            sizes = [g.stop - g.start for g in groups]
            assert max(sizes) * per_head <= 100 or max(sizes) == 1
    monkeypatch.setattr(launch, "TABLE_BUDGET", None)
    assert launch.head_groups(12, 10**12) == [slice(0, 12)]


def _counted(monkeypatch):
    """Counts the kernels' launches (grid's head axis per launch)."""
    heads = []
    for name in ("disentangled_fwd_kernel", "disentangled_bwd_dq_kernel"):
        kernel = getattr(launch, name)

        class Counting:
            def __init__(self, k=kernel, n=name):
                self.k, self.n = k, n

            def __getitem__(self, grid, k=kernel, n=name):
                heads.append((n, grid[1]))
                return k[grid]
        monkeypatch.setattr(launch, name, Counting())
    return heads


def _assert_same(whole, grouped):
    for a, b in zip(whole, grouped):
        assert a.shape == b.shape and torch.isfinite(b).all()
        err = (a - b).abs().max().item()
        assert err <= 2e-6 * max(1.0, a.abs().max().item()), err


def _run(fn, ts, do, budget, monkeypatch):
    monkeypatch.setattr(launch, "TABLE_BUDGET", budget)
    ts = cast(ts, torch.float32, grad=True)
    torch.manual_seed(11)  # the dropout seed
    out = fn(*ts)
    live = [t for t in ts if t is not None]
    return [out, *torch.autograd.grad(out, live, do)]


@pytest.mark.parametrize("mask,pos_batched,dropout", [("key", False, 0.0), ("full", True, 0.2), ("none", False, 0.3)])
def test_padded_groups_equal_one_launch(monkeypatch, mask, pos_batched, dropout):
    B, H, Lq, Lk, D = 2, 5, 37, 29, 16
    q, k, v, pk, pq, m, kw = make_inputs(B, H, Lq, Lk, D, mask=mask, pos_batched=pos_batched)
    ts, do = (q, k, v, pk, pq), torch.randn(B, H, Lq, D)

    def fn(*t):
        return disentangled_attention(*t, attention_mask=m, backend="triton", dropout_p=dropout, **kw)
    whole = _run(fn, ts, do, None, monkeypatch)
    heads = _counted(monkeypatch)
    # forward tables (5 heads x 2 x (37 + 29) rows x nslot x 4 B) are > 1 KB per head: one head per group
    grouped = _run(fn, ts, do, 1024, monkeypatch)
    assert [n for name, n in heads if name == "disentangled_fwd_kernel"] == [B] * H
    assert [n for name, n in heads if name == "disentangled_bwd_dq_kernel"] == [B] * H
    _assert_same(whole, grouped)
    heads.clear()
    nslot = launch._layout(Lq, Lk, kw["position_buckets"], kw["max_relative_positions"], pk.shape[-2] // 2,
                           q.device, True, False).nslot
    _run(fn, ts, do, 2 * B * (Lq + Lk) * nslot * 4, monkeypatch)  # forward tables of 2 heads per group
    assert [n for name, n in heads if name == "disentangled_fwd_kernel"] == [2 * B, 2 * B, B]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_packed_groups_equal_one_launch(monkeypatch, dropout):
    H, D = 3, 16
    lens = [23, 1, 40, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    ts = (torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(H, 512, D),
          torch.randn(H, 512, D))
    do = torch.randn(T, H, D)
    kw = dict(position_buckets=V3[0], max_relative_positions=V3[1])

    def fn(q, k, v, pk, pq):
        return disentangled_attention_varlen(q, k, v, pk, pq, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40,
                                             max_seqlen_k=40, backend="triton", dropout_p=dropout, **kw)
    whole = _run(fn, ts, do, None, monkeypatch)
    heads = _counted(monkeypatch)
    grouped = _run(fn, ts, do, 1, monkeypatch)
    assert [n for _, n in heads] == [len(lens)] * (2 * H)
    _assert_same(whole, grouped)
