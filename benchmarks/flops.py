"""The FLOP counts used for every TFLOP/s number of the suite (written once, here).

Convention (FlashAttention's): a multiply-add is 2 FLOPs; softmax, masking, gathers,
dropout and layout copies are not counted.  We count *useful* work: a padded batch
is counted over the valid tokens of each sequence only, so a candidate that skips
padding shows a higher TFLOP/s and one that computes the padding does not get
credit for it.

Attention core, one sequence of ``l`` valid tokens, ``H`` heads, head dim ``D``,
relative tables of ``2*span`` rows, ``T`` relative terms (c2p, p2c: T <= 2)::

    forward  = 4 * H * l * l * D          # Q K^T and P V
             + T * 2 * H * l * (2*span) * D   # Q pos_key^T (c2p), K pos_query^T (p2c)
    backward = 2.5 * forward              # FlashAttention convention (2 GEMMs fwd, 5 bwd)
    fwd+bwd  = 3.5 * forward

For the relative term GEMMs we count the full ``l x 2*span`` table product, which is
what HF and the reference compute; a kernel that computes fewer table entries
still gets the same count (work is counted by the problem, not the algorithm).

Full model (DeBERTa-v2/v3 encoder, ``N`` layers, hidden ``h``, intermediate ``f``),
per sequence of ``l`` valid tokens::

    per layer = 2 * l * (4 * h * h + 2 * h * f)      # Q, K, V, O projections + FFN
              + attention core forward (above)
              + 2 * 2 * (2*span) * h * h             # per batch: relative-embedding projections
    inference = sum over sequences and layers
    training  = 3 * inference                          # backward = 2 x forward for GEMMs

The relative embeddings (``2*span x h``) go through ``query_proj`` and ``key_proj``
once per layer and batch (share_att_key): ``2 * 2 * (2*span) * h * h`` per layer.
Embedding look-ups, LayerNorm, the pooler/classifier and the optimizer are not
counted.
"""
from __future__ import annotations

from typing import Iterable, Sequence

BACKWARD_FACTOR = 2.5
TRAIN_FACTOR = 3.0


def attention_fwd_flops(lengths: Sequence[int], heads: int, head_dim: int, span: int, rel_terms: int = 2) -> float:
    """Forward FLOPs of the attention core over sequences of the given valid lengths."""
    total = 0.0
    for l in lengths:
        total += 4.0 * heads * l * l * head_dim + rel_terms * 2.0 * heads * l * (2 * span) * head_dim
    return total


def attention_flops(mode: str, lengths: Sequence[int], heads: int, head_dim: int, span: int,
                    rel_terms: int = 2) -> float:
    """``mode``: ``"fwd" | "bwd" | "fwdbwd"``."""
    f = attention_fwd_flops(lengths, heads, head_dim, span, rel_terms)
    if mode == "fwd":
        return f
    if mode == "bwd":
        return BACKWARD_FACTOR * f
    if mode == "fwdbwd":
        return (1.0 + BACKWARD_FACTOR) * f
    raise ValueError(f"unknown mode {mode!r}")


def model_flops(mode: str, lengths: Iterable[int], *, layers: int, hidden: int, heads: int,
                intermediate: int, span: int, rel_terms: int = 2) -> float:
    """``mode``: ``"inference" | "train"``; ``lengths``: valid tokens per sequence."""
    lengths = list(lengths)
    head_dim = hidden // heads
    tokens = sum(lengths)
    per_layer = 2.0 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
    per_layer += 2 * 2.0 * (2 * span) * hidden * hidden
    per_layer += attention_fwd_flops(lengths, heads, head_dim, span, rel_terms)
    f = layers * per_layer
    if mode == "inference":
        return f
    if mode == "train":
        return TRAIN_FACTOR * f
    raise ValueError(f"unknown mode {mode!r}")
