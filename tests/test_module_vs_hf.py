"""DisentangledAttention (torch backend) reproduces HF's DeBERTa-v2/v3 attention exactly (fp64)."""
import pytest
import torch

from deberta_fast import DisentangledAttention, last_backend
from hf_configs import V2_VARIANTS, v2_config

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")

DT = torch.float64
from deberta_fast.hf_attention import _hf_conventions  # noqa: E402
from deberta_fast.reference import normalize_mask  # noqa: E402

# transformers < 4.48 (XSoftmax) zeroes fully masked query rows; later versions make them uniform
_, LEGACY_ZERO_ROWS = _hf_conventions(hf.DisentangledSelfAttention)


def call_hf(ref, *args, **kw):
    out = ref(*args, **kw)
    return out if isinstance(out, tuple) else (out, None)


def check(got, want, mask=None, tol=1e-12):
    """Compare with HF; on legacy versions first zero the rows that XSoftmax zeroes."""
    if LEGACY_ZERO_ROWS and mask is not None:
        L = mask.shape[-1]
        *_, uni = normalize_mask(mask, mask.shape[0], 1, L, L)
        rows = uni[:, 0, :, None] if got.dim() == 3 else uni[..., None]
        got = got.masked_fill(rows, 0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _inputs(cfg, B, L, Lq=None, pad=True):
    x = torch.randn(B, L, cfg.hidden_size, dtype=DT)
    qs = None if Lq is None else torch.randn(B, Lq, cfg.hidden_size, dtype=DT)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad and B > 1:
        mask[1, L // 2 + 1:] = 0  # ragged: padded query rows included
    enc = hf.DebertaV2Encoder(cfg).to(DT)
    rel_emb = enc.get_rel_embedding()
    rel_emb = None if rel_emb is None else rel_emb.detach() + 0.1 * torch.randn_like(rel_emb)
    return x, qs, mask, enc, rel_emb


def _pair(cfg):
    ref = hf.DisentangledSelfAttention(cfg).to(DT).eval()
    ours = DisentangledAttention(cfg, backend="torch").to(DT).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("variant", V2_VARIANTS, ids=str)
@pytest.mark.parametrize("L", [1, 9, 21])
def test_v2_attention_matches_hf(variant, L):
    types, share, buckets, max_rel = variant
    cfg = v2_config(types, share, buckets, max_rel)
    ref, ours = _pair(cfg)
    x, _, mask, enc, rel_emb = _inputs(cfg, 2, L)
    mask4 = enc.get_attention_mask(mask)
    rel_pos = enc.get_rel_pos(x)
    want, want_p = call_hf(ref, x, mask4, output_attentions=True, relative_pos=rel_pos, rel_embeddings=rel_emb)
    # the encoder's 4-D mask and matrix, and the patched path's 2-D mask and no matrix
    got, got_p = ours(x, mask4, output_attentions=True, relative_pos=rel_pos, rel_embeddings=rel_emb)
    got2, _ = ours(x, mask, relative_pos=None, rel_embeddings=rel_emb)
    assert last_backend() == "torch"
    check(got, want, mask4)
    check(got_p, want_p, mask4)
    check(got2, want, mask4)


@pytest.mark.parametrize("variant", V2_VARIANTS[:6], ids=str)
def test_v2_query_states_and_custom_relative_pos(variant):
    types, share, buckets, max_rel = variant
    cfg = v2_config(types, share, buckets, max_rel)
    ref, ours = _pair(cfg)
    x, qs, mask, enc, rel_emb = _inputs(cfg, 2, 13, Lq=13)
    mask4 = enc.get_attention_mask(mask)
    custom = torch.randint(-12, 12, (1, 13, 13))
    for rp in (enc.get_rel_pos(x, qs), custom):
        want, _ = call_hf(ref, x, mask4, query_states=qs, relative_pos=rp, rel_embeddings=rel_emb)
        got, _ = ours(x, mask4, query_states=qs, relative_pos=rp, rel_embeddings=rel_emb)
        check(got, want, mask4)


def test_v2_long_sequence_beyond_buckets():
    cfg = v2_config(("p2c", "c2p"), True, 4, 8)
    ref, ours = _pair(cfg)
    x, _, mask, enc, rel_emb = _inputs(cfg, 2, 70)  # >> 2 * position_buckets
    want, _ = call_hf(ref, x, enc.get_attention_mask(mask), relative_pos=enc.get_rel_pos(x), rel_embeddings=rel_emb)
    got, _ = ours(x, mask, rel_embeddings=rel_emb)
    check(got, want, mask)


@pytest.mark.parametrize("mask_dims", [3, 4])
def test_v2_full_masks_with_fully_masked_rows(mask_dims):
    cfg = v2_config()
    ref, ours = _pair(cfg)
    x, _, _, enc, rel_emb = _inputs(cfg, 2, 11)
    m3 = torch.rand(2, 11, 11) > 0.4
    m3[0, 3] = False  # a row with nothing to attend: HF makes it uniform
    m = m3 if mask_dims == 3 else m3[:, None]
    want, _ = call_hf(ref, x, enc.get_attention_mask(m3), relative_pos=enc.get_rel_pos(x), rel_embeddings=rel_emb)
    got, _ = ours(x, m, rel_embeddings=rel_emb)
    check(got, want, m3)


def test_v2_dropout_reproduces_hf_in_training():
    """Same RNG stream as HF: pos_dropout on rel_embeddings, then dropout on the probabilities."""
    cfg = v2_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    ref, ours = _pair(cfg)
    ref.train(), ours.train()
    x, _, mask, enc, rel_emb = _inputs(cfg, 2, 10)
    torch.manual_seed(7)
    want, _ = call_hf(ref, x, enc.get_attention_mask(mask), relative_pos=enc.get_rel_pos(x), rel_embeddings=rel_emb)
    torch.manual_seed(7)
    got, _ = ours(x, mask, rel_embeddings=rel_emb)
    check(got, want, mask)


def test_from_hf_shares_parameters_and_grads_match():
    cfg = v2_config(("p2c", "c2p"), False, 4, 8)
    ref = hf.DisentangledSelfAttention(cfg).to(DT)
    ours = DisentangledAttention.from_hf(ref, backend="torch")
    assert {id(p) for p in ours.parameters()} == {id(p) for p in ref.parameters()}
    assert list(ours.state_dict()) == list(ref.state_dict())
    x, _, mask, enc, rel_emb = _inputs(cfg, 2, 12, pad=not LEGACY_ZERO_ROWS)  # legacy: padded rows differ
    rel_emb.requires_grad_(True)
    want, _ = call_hf(ref, x, enc.get_attention_mask(mask), relative_pos=enc.get_rel_pos(x), rel_embeddings=rel_emb)
    gw = torch.autograd.grad(want.square().sum(), [rel_emb, *ref.parameters()])
    got, _ = ours(x, mask, rel_embeddings=rel_emb)
    gg = torch.autograd.grad(got.square().sum(), [rel_emb, *ref.parameters()])
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_keyword_construction_and_errors():
    m = DisentangledAttention(hidden_size=64, num_attention_heads=4)
    assert m.position_buckets == 256 and m.max_relative_positions == 512 and m.share_att_key
    with pytest.raises(TypeError, match="hidden_size"):
        DisentangledAttention()
    with pytest.raises(ValueError, match="multiple"):
        DisentangledAttention(hidden_size=30, num_attention_heads=4)
    with pytest.raises(TypeError, match="from_hf"):
        DisentangledAttention.from_hf(torch.nn.Linear(2, 2))
