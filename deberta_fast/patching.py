"""Patch HF DeBERTa models in place so their attention runs through deberta_fast.

Only HF modules are touched, and only through instance attributes:

* each ``DisentangledSelfAttention`` (v1 or v2) gets a ``forward`` that calls
  :mod:`deberta_fast.hf_attention` with the chosen backend;
* each ``DebertaEncoder`` / ``DebertaV2Encoder`` gets ``get_attention_mask``
  that keeps a 2-D padding mask 2-D (no ``[B, 1, L, L]`` mask) and ``get_rel_pos``
  that returns :data:`~deberta_fast.hf_attention.CANONICAL` (no ``[L, L]`` matrix).

Classes, parameters, their identities and ``state_dict`` keys stay as they are;
:func:`unpatch` deletes the instance attributes and HF's behaviour returns.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

from torch import nn

from .backends import BACKENDS
from .dispatch import BackendUnavailableError, check_backend_name, interpreting
from .hf_attention import CANONICAL, _hf_conventions, v1_forward, v2_forward
from .packed_encoder import packed_encoder_forward

_FLAG = "_deberta_fast_patched"
_ATTN_PATCHED = ("forward", "_deberta_fast_conventions")
_ENC_PATCHED = ("get_attention_mask", "get_rel_pos", "forward", "_deberta_fast_pack")

# (module path suffix, class name) -> family
_ATTENTION = {
    ("deberta_v2.modeling_deberta_v2", "DisentangledSelfAttention"): "v2",
    ("deberta.modeling_deberta", "DisentangledSelfAttention"): "v1",
}
_ENCODERS = {
    ("deberta_v2.modeling_deberta_v2", "DebertaV2Encoder"),
    ("deberta.modeling_deberta", "DebertaEncoder"),
}


def _family(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        for (mod_suffix, name), fam in _ATTENTION.items():
            if cls.__name__ == name and cls.__module__.endswith(mod_suffix):
                return fam
    return None


def _is_encoder(module: nn.Module) -> bool:
    return any(cls.__name__ == name and cls.__module__.endswith(suffix)
               for cls in type(module).__mro__ for suffix, name in _ENCODERS)


def _encoder_attention_mask(self, attention_mask):
    """Patched ``get_attention_mask``: 2-D padding masks stay ``[B, L]`` (HF semantics kept by the kernels), as bool
    (nonzero = attend, as HF reads it), made once per forward: the triton kernels read a bool mask as it is, so no
    layer converts it again (host time)."""
    if attention_mask.dim() <= 2:
        return (attention_mask if attention_mask.dim() == 2 else attention_mask[None]).bool()
    if attention_mask.dim() == 3:
        return attention_mask.unsqueeze(1)
    return attention_mask


def _encoder_rel_pos(self, hidden_states, query_states=None, relative_pos=None):
    """Patched ``get_rel_pos``: the canonical positions, as an O(L) table inside the kernels."""
    if getattr(self, "relative_attention", False) and relative_pos is None:
        return CANONICAL
    return relative_pos


def _check_supported(module: nn.Module, family: str) -> None:
    if family == "v1" and (getattr(module, "talking_head", False) or getattr(module, "head_logits_proj", None)):
        raise NotImplementedError(
            f"{type(module).__module__}.{type(module).__name__} uses talking_head attention (heads mixed before "
            "the softmax); no deberta_fast backend serves it. Run this model unpatched.")


def patch(model: nn.Module, backend: str = "auto", pack: bool = True, *, _at_build: bool = False) -> nn.Module:
    """Route every DeBERTa attention inside ``model`` through deberta_fast; returns ``model``.

    Works on DeBERTa v1 and v2/v3 models (any head: ``...Model``, ``...ForSequenceClassification``,
    ``...ForMaskedLM`` ...) and on models that contain them.  Patching twice re-sets the options.
    ``pack=True`` runs right-padded batches packed (no work on padding in any layer; padded
    positions of the outputs are 0, see :mod:`deberta_fast.packed_encoder`) when the backend
    has a packed path (``"auto"``, ``"torch"``, ``"triton"``); otherwise the padded layout runs.
    Training with ``pack=True`` draws attention-dropout masks over the packed layout, so they differ
    from HF's for the same seed (same distribution); ``pack=False`` with the torch backend reproduces
    HF's dropout stream bit for bit.
    Raises ``ValueError`` when ``model`` holds no DeBERTa attention and ``NotImplementedError``
    for variants no backend serves (v1 ``talking_head``), before changing anything.  A named
    backend that cannot run here or on the model's device raises ``BackendUnavailableError``.
    Patched models pickle, ``torch.save`` and ``copy.deepcopy`` as patched models.
    """
    check_backend_name(backend)
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be a bool, got {type(pack).__name__} {pack!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs a torch.nn.Module holding a DeBERTa model, got {type(model).__name__}")
    attentions, encoders = [], []
    for m in model.modules():
        fam = _family(m)
        if fam is not None:
            _check_supported(m, fam)
            attentions.append((m, fam))
        elif _is_encoder(m):
            encoders.append(m)
    if not attentions:
        raise ValueError(
            f"patch(): found no DeBERTa attention (transformers' deberta / deberta_v2 DisentangledSelfAttention) "
            f"in {type(model).__name__}; deberta_fast patches DeBERTa v1, v2, v3 and mDeBERTa models")
    if not _at_build:  # (a model being built has no final device yet)
        _check_backend_serves(model, backend)
    for m, fam in attentions:
        m.forward = functools.partial(v2_forward if fam == "v2" else v1_forward, m)
        m._deberta_fast_conventions = _hf_conventions(type(m))  # decided now, never while tracing
        m._deberta_fast_backend = backend
        setattr(m, _FLAG, True)
    for enc in encoders:
        enc.get_attention_mask = functools.partial(_encoder_attention_mask, enc)
        enc.get_rel_pos = functools.partial(_encoder_rel_pos, enc)
        # pack only where the backend has a packed path ("auto" picks one that does)
        can_pack = pack and (backend == "auto" or BACKENDS[backend].supports_varlen)
        enc._deberta_fast_pack = bool(can_pack)
        if can_pack:
            enc.forward = functools.partial(packed_encoder_forward, enc)
        else:
            enc.__dict__.pop("forward", None)
        setattr(enc, _FLAG, True)
    return model


def _check_backend_serves(model: nn.Module, backend: str) -> None:
    """A named backend that cannot run here, or not on the model's device, is refused at patch time
    (``auto`` picks per call).  Dtype rules are checked per call: autocast may change the dtype."""
    if backend == "auto":
        return
    b = BACKENDS[backend]
    why = b.unavailable()
    if why is None:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else None
        if backend == "cuda" and dev is not None and dev.type != "cuda":
            why = f"the model is on {dev}; the cuda backend runs CUDA tensors only (model.cuda() first)"
        if backend == "triton" and dev is not None and dev.type != "cuda" and not interpreting():
            why = (f"the model is on {dev}; the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                   f"slow CPU interpreter)")
    if why:
        raise BackendUnavailableError(f"patch(backend={backend!r}): {why}. Use backend='auto' to let each call "
                                      f"fall back to a backend that serves it.")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: HF's own methods run again.  Returns ``model``."""
    for m in model.modules():
        if not m.__dict__.get(_FLAG, False):
            continue
        for name in _ATTN_PATCHED + _ENC_PATCHED + ("_deberta_fast_backend", _FLAG):
            m.__dict__.pop(name, None)
    return model


def is_patched(model: nn.Module) -> bool:
    return any(m.__dict__.get(_FLAG, False) for m in model.modules())


@contextlib.contextmanager
def patched(model: nn.Module, backend: str = "auto", pack: bool = True):
    """``with patched(model):`` runs ``model`` through deberta_fast and restores its state on exit: unpatched, or
    a model that was already patched with its own options (backend, packing)."""
    names = _ATTN_PATCHED + _ENC_PATCHED + ("_deberta_fast_backend", _FLAG)
    saved = [(m, {n: m.__dict__[n] for n in names if n in m.__dict__}) for m in model.modules()]
    patch(model, backend, pack)
    try:
        yield model
    finally:
        for m, attrs in saved:
            for n in names:
                m.__dict__.pop(n, None)
            m.__dict__.update(attrs)


# ------------------------------------------------------------------------------ every model transformers builds

_GLOBAL: dict = {}  # class -> its own post_init (or None), while patch_transformers is on
_BUILT = weakref.WeakSet()  # models patched by the global switch


def _pretrained_classes():
    import importlib
    out = []
    for mod, name in (("transformers.models.deberta_v2.modeling_deberta_v2", "DebertaV2PreTrainedModel"),
                      ("transformers.models.deberta.modeling_deberta", "DebertaPreTrainedModel")):
        out.append(getattr(importlib.import_module(mod), name))
    return out


def patch_transformers(backend: str = "auto", pack: bool = True) -> None:
    """From now on every DeBERTa (v1, v2/v3, mDeBERTa) model transformers builds — ``from_pretrained``,
    ``from_config``, ``pipeline`` and libraries on top of them — is :func:`patch`-ed as it is built
    (its ``post_init``).  Models that no backend serves (v1 ``talking_head``) stay HF's, with a
    warning.  :func:`unpatch_transformers` undoes it, for those models too.  Calling it again
    changes the options for models built afterwards."""
    check_backend_name(backend)
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be a bool, got {type(pack).__name__} {pack!r}")
    for cls in _pretrained_classes():
        if cls not in _GLOBAL:
            _GLOBAL[cls] = cls.__dict__.get("post_init")
        base_post_init = _GLOBAL[cls] or super(cls, cls).post_init

        def post_init(self, _orig=base_post_init):
            _orig(self)
            try:
                patch(self, backend, pack, _at_build=True)
            except NotImplementedError as e:
                warnings.warn(f"deberta_fast.patch_transformers: {type(self).__name__} stays HF's: {e}",
                              RuntimeWarning, stacklevel=2)
                return
            _BUILT.add(self)

        cls.post_init = post_init


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers`: models built from now on are HF's, and the models it patched
    are :func:`unpatch`-ed."""
    for cls, own in _GLOBAL.items():
        if own is None:
            del cls.post_init
        else:
            cls.post_init = own
    _GLOBAL.clear()
    for model in list(_BUILT):
        unpatch(model)
    _BUILT.clear()
