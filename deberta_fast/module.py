"""``DisentangledAttention``: a drop-in for HF's DeBERTa-v2/v3 ``DisentangledSelfAttention``."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .dispatch import check_backend_name
from .hf_attention import v2_forward

#: keyword defaults: DeBERTa-v3 attention settings
_V3_DEFAULTS = dict(
    relative_attention=True, position_buckets=256, max_relative_positions=-1, max_position_embeddings=512,
    pos_att_type=("p2c", "c2p"), share_att_key=True, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)


class DisentangledAttention(nn.Module):
    """DeBERTa-v2/v3 disentangled self-attention with fused kernels.

    Parameters and buffers carry HF's names (``query_proj``, ``key_proj``, ``value_proj``,
    ``pos_key_proj``, ``pos_query_proj``), so ``load_state_dict(hf_module.state_dict())``
    works with ``strict=True``.  ``forward`` has HF's signature and returns
    ``(context [B, Lq, H*D], probs [B, H, Lq, Lk] or None)``; ``output_attentions=True``
    runs the reference path (it must build the probabilities).

    Build it from a ``DebertaV2Config`` (``DisentangledAttention(config)``), from keywords
    (``hidden_size``, ``num_attention_heads`` and optionally any config field; others
    default to DeBERTa-v3's attention settings), or share an HF module's parameters with
    :meth:`from_hf`.  ``backend`` is ``"auto" | "torch" | "triton" | "cuda"``.
    """

    def __init__(self, config=None, *, backend: str = "auto", **kwargs):
        super().__init__()
        if config is None:
            if "hidden_size" not in kwargs or "num_attention_heads" not in kwargs:
                raise TypeError("DisentangledAttention needs a DebertaV2Config or the keywords "
                                "hidden_size= and num_attention_heads=")
            config = SimpleNamespace(**{**_V3_DEFAULTS, **kwargs})
        elif kwargs:
            raise TypeError(f"pass either a config or keywords, not both (got {sorted(kwargs)})")
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                             f"heads ({config.num_attention_heads})")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = getattr(config, "attention_head_size",
                                           config.hidden_size // config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.key_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.value_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
        self.share_att_key = getattr(config, "share_att_key", False)
        pos_att_type = config.pos_att_type if config.pos_att_type is not None else []
        if isinstance(pos_att_type, str):
            pos_att_type = [x.strip() for x in pos_att_type.lower().split("|")]
        self.pos_att_type = list(pos_att_type)
        self.relative_attention = getattr(config, "relative_attention", False)
        if self.relative_attention:
            self.position_buckets = getattr(config, "position_buckets", -1)
            self.max_relative_positions = getattr(config, "max_relative_positions", -1)
            if self.max_relative_positions < 1:
                self.max_relative_positions = config.max_position_embeddings
            self.pos_ebd_size = self.position_buckets if self.position_buckets > 0 else self.max_relative_positions
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = nn.Linear(config.hidden_size, self.all_head_size, bias=True)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self._deberta_fast_backend = check_backend_name(backend)
        self._deberta_fast_conventions = (True, False)  # returns (context, probs); masked rows uniform

    @classmethod
    def from_hf(cls, module: nn.Module, backend: str = "auto") -> "DisentangledAttention":
        """A ``DisentangledAttention`` that shares (not copies) an HF v2 module's parameters."""
        if not hasattr(module, "query_proj") or not hasattr(module, "pos_att_type"):
            raise TypeError(f"from_hf expects HF's DeBERTa-v2 DisentangledSelfAttention, got {type(module).__name__}"
                            " (DeBERTa v1 modules are served by deberta_fast.patch)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_attention_heads", "attention_head_size", "all_head_size", "share_att_key",
                     "pos_att_type", "relative_attention", "position_buckets", "max_relative_positions",
                     "pos_ebd_size"):
            if hasattr(module, name):
                setattr(new, name, getattr(module, name))
        new.pos_att_type = list(new.pos_att_type)
        for name, child in module.named_children():
            setattr(new, name, child)
        new._deberta_fast_backend = check_backend_name(backend)
        new._deberta_fast_conventions = (True, False)
        new.train(module.training)
        return new

    @property
    def backend(self) -> str:
        return self._deberta_fast_backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._deberta_fast_backend = check_backend_name(value)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        """hidden_states ``[B, Lk, hidden]``; query_states ``[B, Lq, hidden]`` (default: hidden_states);
        attention_mask ``[B, Lk]`` / ``[B, 1|Lq, Lk]`` / ``[B, 1, 1|Lq, Lk]``; rel_embeddings
        ``[>= 2*span, hidden]`` (the encoder's, after its LayerNorm).  Returns ``(context, probs|None)``."""
        hidden = self.query_proj.in_features
        for name, x in (("hidden_states", hidden_states), ("query_states", query_states)):
            if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden):
                got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a [B, L, hidden_size={hidden}] tensor, got {got}")
        return v2_forward(self, hidden_states, attention_mask, output_attentions, query_states,
                          relative_pos, rel_embeddings)

    def extra_repr(self) -> str:
        return (f"heads={self.num_attention_heads}, head_dim={self.attention_head_size}, "
                f"pos_att_type={self.pos_att_type}, backend={self._deberta_fast_backend!r}")
