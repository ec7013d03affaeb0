"""Libraries built on transformers' DeBERTa, patched globally (``patch_transformers``) or per model, against the
same library unpatched: sentence-transformers ``CrossEncoder``, PEFT LoRA, GLiNER.  Small random models and a
word-level tokenizer saved to a temporary folder: nothing is downloaded.  The libraries are installed by .ci/run's
integrations stage (the README's test command skips these tests with the reason)."""
import copy

import pytest
import torch

import deberta_fast as df

from hf_configs import transformers, v2_config

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the cat sat on a mat alice bob paris london person city went to from".split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    df.unpatch_transformers()


def _save_model_dir(path, head="model", num_labels=1):
    """A DeBERTa-v3-like random model (buckets 4 / max 8, so sentences pass 2 * buckets) and its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    cfg = v2_config(num_labels=num_labels)  # (vocab 97 >= len(WORDS))
    torch.manual_seed(0)
    cls = transformers.DebertaV2Model if head == "model" else transformers.DebertaV2ForSequenceClassification
    cls(cfg).save_pretrained(path)
    return str(path)


PAIRS = [("alice went to paris", "the cat sat on a mat from london to paris"), ("bob", "a cat"),
         ("the cat sat on a mat", "alice went from london to paris the cat sat")]


def test_sentence_transformers_cross_encoder_through_patch_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    path = _save_model_dir(tmp_path, head="cls")
    want = st.CrossEncoder(path, device="cpu").predict(PAIRS, convert_to_tensor=True)
    df.patch_transformers(backend="torch")
    ce = st.CrossEncoder(path, device="cpu")
    assert df.is_patched(ce.model), "patch_transformers did not reach the model CrossEncoder loaded"
    got = ce.predict(PAIRS, convert_to_tensor=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    df.unpatch_transformers()
    assert not df.is_patched(ce.model)


@pytest.mark.parametrize("pack", [False, True])
def test_peft_lora_training_step_matches_hf(pack):
    peft = pytest.importorskip("peft")
    cfg = v2_config(num_labels=3)
    torch.manual_seed(0)
    base = transformers.DebertaV2ForSequenceClassification(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_proj", "value_proj"], lora_dropout=0.0,
                           task_type="SEQ_CLS", init_lora_weights=False)  # non-zero B: LoRA changes the output
    ref = peft.get_peft_model(base, lora)
    model = copy.deepcopy(ref)
    df.patch(model, backend="torch", pack=pack)
    assert df.is_patched(model) and not df.is_patched(ref)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (3, 21), generator=g)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 13:] = 0
    labels = torch.tensor([0, 2, 1])
    outs = [m(input_ids=ids, attention_mask=mask, labels=labels) for m in (model, ref)]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-6)
    for o in outs:
        o.loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, _ in trained)
    for (n, p), q in zip(trained, [q for q in ref.parameters() if q.requires_grad]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_gliner_through_patch_transformers(tmp_path):
    pytest.importorskip("gliner")
    from gliner import GLiNERConfig
    from gliner.model import UniEncoderSpanGLiNER

    path = _save_model_dir(tmp_path / "backbone")
    cfg = GLiNERConfig(model_name=path, hidden_size=32, max_width=4, dropout=0.0, subtoken_pooling="first",
                       span_mode="markerV0")
    torch.manual_seed(1)
    ref = UniEncoderSpanGLiNER(cfg).eval()
    df.patch_transformers(backend="torch")
    torch.manual_seed(1)
    model = UniEncoderSpanGLiNER(cfg).eval()
    assert df.is_patched(model) and not df.is_patched(ref)
    model.load_state_dict(ref.state_dict())

    def encoder_outputs(m):
        enc = next(x for x in m.modules() if isinstance(x, transformers.DebertaV2Model))
        seen = []
        hook = enc.register_forward_hook(lambda mod, args, out: seen.append(out.last_hidden_state.detach()))
        with torch.no_grad():
            preds = m.predict_entities("alice went from london to paris the cat sat on a mat", ["person", "city"],
                                       threshold=0.0)
        hook.remove()
        return seen, preds

    (got, got_preds), (want, want_preds) = encoder_outputs(model), encoder_outputs(ref)
    assert got and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_preds == want_preds
