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
