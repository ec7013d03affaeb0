"""patch / unpatch / patched on real HF DeBERTa models (v1 and v2/v3), fp64, torch backend."""
import pytest
import torch

import deberta_fast
from deberta_fast import CANONICAL, is_patched, patch, patched, unpatch
from hf_configs import v1_config, v2_config

transformers = pytest.importorskip("transformers")
DT = torch.float64

V2_HEADS = ["DebertaV2Model", "DebertaV2ForSequenceClassification", "DebertaV2ForTokenClassification",
            "DebertaV2ForQuestionAnswering", "DebertaV2ForMaskedLM", "DebertaV2ForMultipleChoice"]
V1_HEADS = ["DebertaModel", "DebertaForSequenceClassification", "DebertaForMaskedLM"]


def _batch(B=3, L=19, mc=False):
    ids = torch.randint(1, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    if mc:  # multiple choice: [B, choices, L]
        return ids[:, None].expand(B, 2, L).contiguous(), mask[:, None].expand(B, 2, L).contiguous()
    return ids, mask


def _outputs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states if out.hidden_states is not None else ()
    first = out[0]
    return [first, *hs]


def _valid(x, mask):
    """Zero the padded positions of per-token outputs (packing leaves 0 there; HF leaves garbage)."""
    m = mask.reshape(-1, mask.shape[-1])
    if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(m.shape):
        return x * m.view(*m.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return x


def _compare(model, ids, mask, backend="torch"):
    want = _outputs(model, ids, mask)
    for pack in (False, True):
        patch(model, backend=backend, pack=pack)
        assert is_patched(model)
        got = _outputs(model, ids, mask)
        unpatch(model)
        assert not is_patched(model)
        for g, w in zip(got, want):
            if pack:  # equal on real tokens, exactly 0 on padding
                torch.testing.assert_close(_valid(g, mask), _valid(w, mask), rtol=1e-10, atol=1e-10)
                if g.dim() == 3 and g.shape[:2] == mask.reshape(-1, mask.shape[-1]).shape:
                    assert torch.equal(_valid(g, mask), g)
            else:  # identical to HF everywhere
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    again = _outputs(model, ids, mask)
    for a, w in zip(again, want):
        assert torch.equal(a, w)  # unpatch restores HF exactly


@pytest.mark.parametrize("head", V2_HEADS)
def test_v2_heads_match_hf(head):
    cfg = v2_config(conv=3)  # conv layer of v2 included
    model = getattr(transformers, head)(cfg).to(DT).eval()
    keys = list(model.state_dict())
    ids = {id(p) for p in model.parameters()}
    classes = [type(m) for m in model.modules()]
    _compare(model, *_batch(mc=head.endswith("MultipleChoice")))
    patch(model)
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == ids
    assert [type(m) for m in model.modules()] == classes  # HF classes kept


def test_patched_context_restores_the_previous_options():
    """``patched()`` on a model patched with other options gives them back on exit (it left the context's own), and on
    an unpatched model unpatches; a patch raising inside the context is undone too."""
    from deberta_fast.patching import patched as ctx

    model = transformers.DebertaV2Model(v2_config()).to(DT).eval()
    enc = model.encoder
    attn = [m for m in model.modules() if "_deberta_fast_backend" in m.__dict__]
    assert not attn
    patch(model, backend="torch", pack=False)
    attn = [m for m in model.modules() if "_deberta_fast_backend" in m.__dict__]
    with ctx(model, backend="auto", pack=True):
        assert enc._deberta_fast_pack and {m._deberta_fast_backend for m in attn} == {"auto"}
    assert not enc._deberta_fast_pack and {m._deberta_fast_backend for m in attn} == {"torch"}
    assert "forward" not in enc.__dict__  # the padded layout, as before
    unpatch(model)
    with pytest.raises(RuntimeError, match="inside"):
        with ctx(model, backend="torch"):
            raise RuntimeError("inside")
    assert not is_patched(model)


def test_extended_4d_mask_matches_hf():
    """HF's models take an extended ``[B, 1, 1, L]`` mask too (the embeddings squeeze it, the attention broadcasts
    it: keys masked, padded query rows attend as any other): the patched model gives HF's output, packing or not (a
    mask that is not 2-D runs the padded layout).  Without the conv layer: HF's own fails on such a mask."""
    model = transformers.DebertaV2Model(v2_config()).to(DT).eval()
    ids, mask = _batch()
    ext = mask[:, None, None, :]
    want = _outputs(model, ids, ext)
    for pack in (False, True):
        with patched(model, backend="torch", pack=pack):
            got = _outputs(model, ids, ext)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("types", [("c2p",), ("p2c",), ("p2c", "c2p")])
@pytest.mark.parametrize("share", [True, False])
def test_v2_variants_long_padded(types, share):
    cfg = v2_config(types, share, 4, 8)
    model = transformers.DebertaV2Model(cfg).to(DT).eval()
    _compare(model, *_batch(L=37))


@pytest.mark.parametrize("head", V1_HEADS)
@pytest.mark.parametrize("types", [("c2p", "p2c"), ("c2p",), ("p2c",)])
def test_v1_heads_match_hf(head, types):
    cfg = v1_config(types, max_relative_positions=8)
    model = getattr(transformers, head)(cfg).to(DT).eval()
    _compare(model, *_batch(L=23))  # L > max_relative_positions: clamped span


def test_v1_short_sequence_span():
    cfg = v1_config(max_relative_positions=16)
    model = transformers.DebertaModel(cfg).to(DT).eval()
    _compare(model, *_batch(L=5))  # span = min(L, max_rel) = 5


@pytest.mark.parametrize("pack", [False, True])
def test_gradients_and_training_dropout_match_hf(pack):
    """Unpacked: the same RNG stream as HF, so even dropout matches.  Packed: dropout off, same grads."""
    p = 0.0 if pack else 0.1
    cfg = v2_config(hidden_dropout_prob=p, attention_probs_dropout_prob=p, conv=3)
    model = transformers.DebertaV2ForSequenceClassification(cfg).to(DT).train()
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 0])

    def step():
        torch.manual_seed(3)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = step()
    with patched(model, backend="torch", pack=pack):
        got = step()
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_output_attentions_through_patch():
    cfg = v2_config()
    model = transformers.DebertaV2Model(cfg).to(DT).eval()
    ids, mask = _batch()
    want = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    with patched(model, backend="torch"):
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pack", [False, True])
def test_patched_encoder_builds_no_quadratic_tensors(monkeypatch, pack):
    """Fused path: the attention gets the 2-D mask (or packed tokens) and no [L, L] position matrix."""
    cfg = v2_config(conv=3)
    model = transformers.DebertaV2Model(cfg).to(DT).eval()
    seen = []
    ha = deberta_fast.hf_attention
    real, real_varlen = ha.disentangled_attention, ha.disentangled_attention_varlen

    def spy(q, k, v, pk, pq, **kw):
        seen.append(("padded", tuple(kw["attention_mask"].shape)))
        return real(q, k, v, pk, pq, **kw)

    def spy_varlen(q, k, v, pk, pq, *a, **kw):
        seen.append(("packed", q.shape[0]))
        return real_varlen(q, k, v, pk, pq, *a, **kw)

    hf_mod = __import__("transformers.models.deberta_v2.modeling_deberta_v2", fromlist=["x"])

    def forbidden(*a, **k):
        raise AssertionError("build_relative_position called on the patched path")

    monkeypatch.setattr(ha, "disentangled_attention", spy)
    monkeypatch.setattr(ha, "disentangled_attention_varlen", spy_varlen)
    ids, mask = _batch()
    with patched(model, backend="torch", pack=pack):
        assert model.encoder.get_rel_pos(torch.zeros(1, 5, 32)) is CANONICAL
        monkeypatch.setattr(hf_mod, "build_relative_position", forbidden)
        model(input_ids=ids, attention_mask=mask)
    want = ("packed", int(mask.sum())) if pack else ("padded", tuple(mask.shape))
    assert len(seen) == cfg.num_hidden_layers and all(s == want for s in seen)


def test_patch_errors_and_wrapper_models():
    with pytest.raises(ValueError, match="no DeBERTa attention"):
        patch(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        patch(transformers.DebertaV2Model(v2_config()), backend="flash")
    cfg = v1_config(talking_head=True)
    talking = transformers.DebertaModel(cfg)
    with pytest.raises(NotImplementedError, match="talking_head"):
        patch(talking)
    assert not is_patched(talking)  # refused before touching anything

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = transformers.DebertaV2Model(v2_config()).to(DT).eval()
            self.head = torch.nn.Linear(32, 2).to(DT)

        def forward(self, ids, mask):
            return self.head(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state)

    w = Wrapper()
    ids, mask = _batch()
    want = w(ids, mask)
    with patched(w, backend="torch"):  # packed: equal on real tokens
        torch.testing.assert_close(_valid(w(ids, mask), mask), _valid(want, mask), rtol=1e-10, atol=1e-10)
    with patched(w, backend="torch", pack=False):
        torch.testing.assert_close(w(ids, mask), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pack", [True, False])
def test_pickle_deepcopy_and_torch_save_stay_patched(pack, tmp_path):
    """Regression: pickle.dumps of a patched model succeeded and loading failed (bound methods of
    module functions); now pickle, torch.save/load and deepcopy round-trip and stay patched."""
    import copy
    import pickle
    model = transformers.DebertaV2Model(v2_config()).to(DT).eval()
    patch(model, backend="torch", pack=pack)
    ids, mask = _batch()
    want = _valid(model(input_ids=ids, attention_mask=mask)[0], mask)
    torch.save(model, tmp_path / "m.pt")
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
              torch.load(tmp_path / "m.pt", weights_only=False)]
    for clone in clones:
        assert is_patched(clone)
        attn = clone.encoder.layer[0].attention.self
        assert attn.forward.args[0] is attn  # bound to the clone, not to the original
        torch.testing.assert_close(_valid(clone(input_ids=ids, attention_mask=mask)[0], mask), want,
                                   rtol=0, atol=0)
        unpatch(clone)
        assert not is_patched(clone)


def test_named_backend_refused_at_patch_time():
    """patch(model, backend='cuda') where the cuda backend cannot run the model fails at patch time,
    with the reason, and leaves the model unpatched."""
    model = transformers.DebertaV2Model(v2_config())
    with pytest.raises(deberta_fast.BackendUnavailableError, match="patch\\(backend='cuda'\\)"):
        patch(model, backend="cuda")
    assert not is_patched(model)


def test_patch_transformers_patches_every_model_built(tmp_path):
    """The global switch: models built by class, from_config and from_pretrained come out patched and
    equal HF's; unpatch_transformers restores HF for new models and for the ones it patched."""
    cfg = v2_config()
    ref = transformers.DebertaV2Model(cfg).to(DT).eval()
    ref.save_pretrained(tmp_path)
    ids, mask = _batch()
    want = _valid(ref(input_ids=ids, attention_mask=mask)[0], mask)
    deberta_fast.patch_transformers(backend="torch")
    try:
        built = [transformers.DebertaV2ForSequenceClassification(cfg),
                 transformers.AutoModel.from_config(cfg),
                 transformers.AutoModel.from_pretrained(tmp_path, torch_dtype=DT),
                 transformers.DebertaModel(v1_config())]
        assert all(is_patched(m) for m in built)
        loaded = built[2].eval()
        torch.testing.assert_close(_valid(loaded(input_ids=ids, attention_mask=mask)[0], mask), want)
        with pytest.warns(RuntimeWarning, match="stays HF's"):
            talking = transformers.DebertaModel(v1_config(talking_head=True))
        assert not is_patched(talking)
    finally:
        deberta_fast.unpatch_transformers()
    assert not any(is_patched(m) for m in built)
    assert not is_patched(transformers.DebertaV2Model(cfg))
