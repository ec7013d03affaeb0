import pytest
import torch

from deberta_fast.positions import attention_span, relative_slot_table, slot_band

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")


@pytest.mark.parametrize("buckets,max_rel", [(4, 8), (256, 512), (-1, 6), (8, 16), (3, 7), (32, 64)])
@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (5, 23), (40, 9), (300, 300)])
def test_slot_table_matches_hf(buckets, max_rel, lq, lk):
    span = attention_span(buckets, max_rel)
    try:  # transformers >= 4.48 takes tensors, older versions sizes
        rel = hf.build_relative_position(torch.empty(1, lq, 4), torch.empty(1, lk, 4), bucket_size=buckets,
                                         max_position=max_rel)[0]  # [Lq, Lk]
    except (TypeError, AttributeError):
        rel = hf.build_relative_position(lq, lk, bucket_size=buckets, max_position=max_rel)[0]
    hf_c2p = torch.clamp(rel + span, 0, 2 * span - 1)
    table = relative_slot_table(lq, lk, buckets, max_rel, device="cpu")
    assert table.dtype == torch.int32 and table.shape == (lq + lk - 1,)
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    assert torch.equal(table.long()[i - j + lk - 1], hf_c2p)
    if lq == lk:  # HF's p2c index: clamp(-rel[j, i] + span), transposed back
        hf_p2c = torch.clamp(-rel + span, 0, 2 * span - 1).t()
        assert torch.equal(table.long()[i - j + lk - 1], hf_p2c)


@pytest.mark.parametrize("buckets,max_rel", [(4, 8), (256, 512), (-1, 6), (8, 16), (3, 7)])
def test_slot_band_is_saturation(buckets, max_rel):
    band = slot_band(buckets, max_rel)
    span = band.span
    n = 4 * max(span, max_rel) + 50
    table = relative_slot_table(n, n, buckets, max_rel).long()
    d = torch.arange(-(n - 1), n)
    assert (table[d >= band.hi] == 2 * span - 1).all()
    assert (table[d <= band.lo] == 0).all()
    if band.hi > n:  # degenerate bucket function: no saturation assumed, gathers everywhere
        return
    # tight: just inside the band the slot is not saturated
    assert table[d == band.hi - 1].item() != 2 * span - 1
    assert table[d == band.lo + 1].item() != 0


def test_table_validation():
    with pytest.raises(ValueError, match="lengths"):
        relative_slot_table(0, 3, 4, 8)
    with pytest.raises(ValueError, match="span"):
        relative_slot_table(3, 3, -1, -1, span=0)


@pytest.mark.parametrize("buckets,max_rel", [(4, 8), (256, 512), (-1, 6), (8, 16), (3, 7), (16, 4), (8, 6), (-1, 32)])
@pytest.mark.parametrize("lq,lk", [(1, 1), (2, 1), (17, 17), (5, 23), (40, 9), (300, 300), (700, 650)])
def test_distance_runs(buckets, max_rel, lq, lk):
    """The triton backward's runs (``distance_runs``): run ``clamp(d - lo, 0, hi - lo)`` uses table row
    ``run_rows[run]`` for every distance (what the host fold relies on); the end runs are the table's constant ends
    (tight: the distances just inside differ); every saturated tile of ``slot_band`` lies in an end run."""
    from deberta_fast.positions import distance_runs, trimmed_slot_table

    span = attention_span(buckets, max_rel)
    runs = distance_runs(lq, lk, buckets, max_rel, span)
    table = trimmed_slot_table(lq, lk, buckets, max_rel, span)[0].long()
    d = torch.arange(-(lk - 1), lq)
    run = torch.clamp(d - runs.lo, 0, runs.hi - runs.lo)
    assert runs.count == runs.run_rows.numel() == runs.hi - runs.lo + 1 <= lq + lk + 1
    assert torch.equal(runs.run_rows[run], table)
    assert -lk <= runs.lo < runs.hi <= lq
    if runs.lo >= -(lk - 1) and runs.lo + 1 <= lq - 1:
        assert table[runs.lo + 1 + lk - 1] != table[runs.lo + lk - 1]
    if runs.hi <= lq - 1 and runs.hi - 1 >= -(lk - 1):
        assert table[runs.hi - 1 + lk - 1] != table[runs.hi + lk - 1]
    assert runs.unique == bool((runs.run_rows[1:] > runs.run_rows[:-1]).all())
    band = slot_band(buckets, max_rel, span)
    assert band.hi > lq - 1 or band.hi >= runs.hi  # d >= band.hi (saturated tiles): the upper end run
    assert band.lo < -(lk - 1) or band.lo <= runs.lo


def test_host_helpers_ignore_the_default_device():
    """``torch.set_default_device`` (here "meta", standing in for "cuda" on a CPU machine) must not leak into the
    CPU-side tables: every constant names its device (a GPU run found a crash with a CUDA default device)."""
    from deberta_fast import positions as P
    from deberta_fast.backends.triton_backend import draw_seed

    args = (19, 23, 4, 8, 4)
    want = (P.relative_slot_table(*args), P.distance_runs(*args), P.slot_band(4, 8, 4), P.table_band(*args))
    for f in (*P.shape_caches(), P._slot_band_cached):
        f.cache_clear()
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = (P.relative_slot_table(*args), P.distance_runs(*args), P.slot_band(4, 8, 4), P.table_band(*args))
        seed = draw_seed(torch.device("cpu"))
        rel = P.relative_delta(torch.arange(-30, 31, device="cpu"), 4, 8)
    finally:
        torch.set_default_device(None if prev.type == "cpu" else prev)
    assert got[0].device.type == "cpu" and torch.equal(got[0], want[0])
    assert got[1].run_rows.device.type == "cpu" and torch.equal(got[1].run_rows, want[1].run_rows)
    assert (got[1].lo, got[1].hi, got[2], got[3]) == (want[1].lo, want[1].hi, want[2], want[3])
    assert seed.device.type == "cpu" and seed.dtype == torch.int64 and rel.device.type == "cpu"


@pytest.mark.parametrize("buckets,max_rel", [(4, 8), (256, 512), (-1, 12), (16, 4), (8, 6), (8, 32)])
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 17), (5, 40), (40, 5), (300, 300)])
def test_table_band_is_the_tables_own(buckets, max_rel, q_len, k_len):
    """``table_band``: every d <= lo of the table has slot 0, d = lo + 1 (if in the table) does not; every d >= hi
    has slot 2*span - 1, d = hi - 1 does not; lo = -k_len / hi = q_len where no d does.  Any bucket function
    (monotone or not); within the function's own band where that is defined."""
    from deberta_fast.positions import table_band

    span = attention_span(buckets, max_rel)
    table = relative_slot_table(q_len, k_len, buckets, max_rel, span).long()
    d = torch.arange(-(k_len - 1), q_len)
    band = table_band(q_len, k_len, buckets, max_rel, span)
    assert -k_len <= band.lo < band.hi <= q_len and band.span == span
    assert bool((table[d <= band.lo] == 0).all()) and bool((table[d >= band.hi] == 2 * span - 1).all())
    if band.lo + 1 < q_len:
        assert int(table[band.lo + 1 + k_len - 1]) != 0
    if band.hi - 1 > -k_len:
        assert int(table[band.hi - 1 + k_len - 1]) != 2 * span - 1
    fn = slot_band(buckets, max_rel, span)
    if abs(fn.lo) < 1 << 40:  # a saturating (monotone) function: the table's band is the function's, clipped
        assert band.lo == (-k_len if fn.lo < -(k_len - 1) else min(fn.lo, q_len - 1))
        assert band.hi == (q_len if fn.hi > q_len - 1 else max(fn.hi, -(k_len - 1)))
