"""Packed execution of a patched HF DeBERTa encoder: no work on padding in any layer.

At the encoder's entry a right-padded batch ``[B, L, hidden]`` is packed once into
``[1, T, hidden]`` (T = number of real tokens); every layer (attention through
:func:`~deberta_fast.disentangled_attention_varlen`, feed-forward, layer norms) runs on
the packed tokens, the v2 conv layer runs on the padded layout it needs, and each
hidden state is unpacked at the exit.

Outputs and gradients equal HF's on real tokens.  **Padded positions of every returned
hidden state are 0** (HF computes finite values there from a uniform attention over the
padded row, which no head or loss uses).  Batches that cannot be packed (left padding,
holes in the mask, rows with no token, a 3-D/4-D mask, ``output_attentions``,
``query_states``, a caller's ``relative_pos``) run HF's own forward, unchanged.  Under
``torch.compile`` and ``torch.export`` the encoder runs the padded layout (HF's forward with the
patched attention): one graph whatever the batch's padding, the same outputs on real tokens.
"""
from __future__ import annotations

import torch

from .backends.base import graph_capturing
from .hf_attention import CANONICAL
from .packing import PackInfo, pack, pack_info, unpack


class PackedMask:
    """Passed by the packed encoder as ``attention_mask``: the sequences inside the packed batch."""

    def __init__(self, info: PackInfo):
        self.info = info

    def __repr__(self):
        return f"PackedMask(batch={self.info.batch}, seqlen={self.info.seqlen}, tokens={self.info.total})"


def _packable(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos) -> bool:
    if not getattr(self, "_deberta_fast_pack", False) or output_attentions or query_states is not None:
        return False
    if relative_pos is not None or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        return False
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: the padded layout, one graph for every batch and length (packing's
        # token count depends on the mask's values, which would split the graph or pin it to one batch)
        return False
    if graph_capturing(hidden_states.device):
        # a CUDA graph captures: the padded layout (packing reads the mask's values back, a sync a capture forbids)
        return False
    m = attention_mask.bool()
    lens = m.sum(-1)
    right_padded = m == (torch.arange(m.shape[-1], device=m.device)[None, :] < lens[:, None])
    # one sync: padding present, every row right-padded and non-empty
    has_pad, ok = torch.stack([(~m).any(), right_padded.all() & (lens > 0).all()]).tolist()
    return bool(has_pad and ok)


def _run_layer(self, layer, hidden, mask, rel_embeddings):
    kwargs = dict(query_states=None, relative_pos=CANONICAL, rel_embeddings=rel_embeddings)
    if (getattr(self, "gradient_checkpointing", False) and self.training
            and not hasattr(layer, "gradient_checkpointing") and hasattr(self, "_gradient_checkpointing_func")):
        # transformers < 4.48: the encoder, not the layer, checkpoints
        out = self._gradient_checkpointing_func(layer.__call__, hidden, mask, None, CANONICAL, rel_embeddings, False)
    else:
        out = layer(hidden, mask, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def packed_encoder_forward(self, hidden_states, attention_mask, output_hidden_states=True, output_attentions=False,
                           query_states=None, relative_pos=None, return_dict=True):
    """Drop-in ``forward`` for HF's ``DebertaEncoder`` / ``DebertaV2Encoder`` (same signature and outputs)."""
    if not _packable(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos):
        return type(self).forward(self, hidden_states, attention_mask, output_hidden_states, output_attentions,
                                  query_states, relative_pos, return_dict)
    from transformers.modeling_outputs import BaseModelOutput

    info = pack_info(attention_mask)
    mask = PackedMask(info)
    conv = getattr(self, "conv", None)
    rel_embeddings = self.get_rel_embedding()
    all_hidden = (hidden_states,) if output_hidden_states else None
    packed = pack(hidden_states, info)[None]  # [1, T, hidden]
    out = hidden_states
    for i, layer in enumerate(self.layer):
        packed = _run_layer(self, layer, packed, mask, rel_embeddings)
        out = None
        if i == 0 and conv is not None:  # the conv mixes neighbours: run it on the padded layout
            out = conv(hidden_states, unpack(packed[0], info), attention_mask)
            packed = pack(out, info)[None]
        if output_hidden_states or i == len(self.layer) - 1:
            out = out if out is not None else unpack(packed[0], info)
            if output_hidden_states:
                all_hidden = all_hidden + (out,)
    if not return_dict:
        return tuple(x for x in (out, all_hidden) if x is not None)
    return BaseModelOutput(last_hidden_state=out, hidden_states=all_hidden, attentions=None)
