"""Benchmark profiles and the seeded batches they use.

``quick``: CPU smoke profile, small shapes, fp32; the whole suite runs in a few minutes
on 2 cores.  Its numbers exercise the harness; they say nothing about GPU speed.
``full``: GPU profile: DeBERTa-v3-base attention (H=12, D=64), 16,384 tokens per
batch at L = 128 ... 8192 plus L = 65,536 with B = 1, bf16 and fp16; padded
MNLI-like batches; long-document batches; v3-base and v3-large models.
``headline``: GPU profile sized for a short lease: the issue goals' shapes only (bf16, 16,384 tokens at
L = 512, 2048, 8192, forward and forward+backward; v3-base with the peers at MNLI-like and L = 8192 batches,
inference and a training step), fewer timed rounds.

Selection: ``--profile`` (pytest option) > ``DEBERTA_FAST_BENCH_PROFILE`` > auto
(``full`` when CUDA is available, else ``quick``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

# DeBERTa-v3 relative-position settings (HF resolves max_relative_positions=-1 to 512).
V3_BUCKETS = 256
V3_MAX_REL = 512
V3_SPAN = 256


@dataclass(frozen=True)
class Batch:
    """A batch of sequences: ``lengths`` valid tokens each, padded to ``padded_len``."""

    name: str
    lengths: tuple
    padded_len: int

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def dense(self) -> bool:
        return all(l == self.padded_len for l in self.lengths)

    def mask(self, device="cpu") -> torch.Tensor:
        """bool ``[B, L]``, True on valid tokens (right padding)."""
        ar = torch.arange(self.padded_len)[None, :]
        return (ar < torch.tensor(self.lengths)[:, None]).to(device)


def dense_batch(batch: int, length: int) -> Batch:
    return Batch(f"dense-B{batch}-L{length}", (length,) * batch, length)


def mnli_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """Token counts of n MNLI-like premise/hypothesis pairs ([CLS] p [SEP] h [SEP]).

    Lognormal around ~40 tokens (median 36, long right tail), like MNLI's
    matched validation set tokenised with DeBERTa-v3's SentencePiece; truncated
    to ``max_len``; at least 8 tokens.  Fixed by ``seed``.
    """
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=math.log(36.0), sigma=0.45, size=n)
    return [int(min(max_len, max(8, round(v)))) for v in x]


def mnli_batch(batch: int, max_len: int, seed: int = 1234, multiple_of: int = 8) -> Batch:
    """Dynamic padding to the batch maximum rounded up to ``multiple_of`` (HF's
    DataCollatorWithPadding(pad_to_multiple_of=8)), capped at ``max_len``."""
    lengths = mnli_lengths(batch, max_len, seed)
    padded = min(max_len, int(math.ceil(max(lengths) / multiple_of) * multiple_of))
    return Batch(f"mnli-B{batch}-max{max_len}", tuple(lengths), padded)


def long_doc_batch(total_tokens: int, seed: int = 4321, max_len: int = 65536) -> Batch:
    """Long documents adding up to ~``total_tokens``: lognormal lengths around 3k
    tokens (min 1024, max min(8192, total)), padded to the longest.  A single
    document when ``total_tokens`` <= 2048 or > 16384 (one long input, B=1)."""
    if total_tokens <= 2048 or total_tokens > 16384:
        return Batch(f"doc-B1-L{total_tokens}", (total_tokens,), total_tokens)
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    cap = min(8192, total_tokens, max_len)
    while sum(lengths) < total_tokens:
        l = int(min(cap, max(1024, round(rng.lognormal(math.log(3000.0), 0.6)))))
        l = min(l, total_tokens - sum(lengths)) if sum(lengths) + l > total_tokens else l
        lengths.append(max(l, 1024))
    padded = int(math.ceil(max(lengths) / 64) * 64)
    return Batch(f"docs-B{len(lengths)}-{total_tokens}tok", tuple(lengths), padded)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    def config(self, **overrides):
        from transformers import DebertaV2Config

        kw = dict(
            vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=self.intermediate,
            hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            max_position_embeddings=512, type_vocab_size=0, initializer_range=0.02,
            layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
            position_buckets=V3_BUCKETS, pad_token_id=0, position_biased_input=False,
            pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
            num_labels=3,
        )
        kw.update(overrides)
        return DebertaV2Config(**kw)


V3_BASE = ModelShape("v3-base", 768, 12, 12, 3072, 128100)
V3_LARGE = ModelShape("v3-large", 1024, 24, 16, 4096, 128100)
# quick profile: same widths, 2 layers and a small vocabulary (neither changes the attention)
V3_BASE_2L = ModelShape("v3-base-2L", 768, 2, 12, 3072, 1000)
V3_LARGE_2L = ModelShape("v3-large-2L", 1024, 2, 16, 4096, 1000)


@dataclass
class Profile:
    name: str
    device: str
    dtypes: tuple
    heads: int
    head_dim: int
    core_batches: tuple
    core_modes: tuple
    model_shapes: tuple
    model_batches: dict  # mode -> batches
    time_budget_s: float  # target seconds of timed rounds per case
    min_rounds: int
    max_rounds: int
    warmup_rounds: int
    flush_bytes: int
    extra: dict = field(default_factory=dict)


def quick_profile(device: str) -> Profile:
    return Profile(
        name="quick", device=device, dtypes=(torch.float32,), heads=12, head_dim=64,
        core_batches=(dense_batch(2, 128), dense_batch(1, 256), mnli_batch(8, 128, seed=5)),
        core_modes=("fwd", "bwd", "fwdbwd"),
        model_shapes=(V3_BASE_2L, V3_LARGE_2L),
        model_batches={"inference": (mnli_batch(8, 128, seed=5),), "train": (mnli_batch(4, 128, seed=99),)},
        time_budget_s=0.25, min_rounds=3, max_rounds=15, warmup_rounds=1,
        flush_bytes=32 << 20,
    )


def full_profile(device: str) -> Profile:
    tokens = 16384
    core = tuple(dense_batch(tokens // L, L) for L in (128, 512, 1024, 2048, 4096, 8192))
    core += (dense_batch(1, 65536), mnli_batch(256, 128), mnli_batch(256, 256, seed=77))
    long_docs = tuple(long_doc_batch(t) for t in (2048, 8192, 16384, 65536))
    return Profile(
        name="full", device=device, dtypes=(torch.bfloat16, torch.float16), heads=12, head_dim=64,
        core_batches=core, core_modes=("fwd", "bwd", "fwdbwd"),
        model_shapes=(V3_BASE, V3_LARGE),
        model_batches={"inference": (mnli_batch(64, 128), mnli_batch(64, 256, seed=77)) + long_docs,
                       "train": (mnli_batch(32, 128, seed=99), long_doc_batch(8192))},
        time_budget_s=1.0, min_rounds=10, max_rounds=200, warmup_rounds=3,
        flush_bytes=256 << 20,
    )


def headline_profile(device: str) -> Profile:
    tokens = 16384
    return Profile(
        name="headline", device=device, dtypes=(torch.bfloat16,), heads=12, head_dim=64,
        core_batches=tuple(dense_batch(tokens // L, L) for L in (512, 2048, 8192)), core_modes=("fwd", "fwdbwd"),
        model_shapes=(V3_BASE,),
        model_batches={"inference": (mnli_batch(64, 128), dense_batch(2, 8192)),
                       "train": (mnli_batch(32, 128, seed=99), dense_batch(1, 8192))},
        time_budget_s=0.3, min_rounds=5, max_rounds=100, warmup_rounds=2,
        flush_bytes=256 << 20,
    )


def select_profile(option: str | None = None) -> Profile:
    name = option or os.environ.get("DEBERTA_FAST_BENCH_PROFILE") or "auto"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        name = "full" if device == "cuda" else "quick"
    if name == "quick":
        return quick_profile(device)
    if name in ("full", "headline"):
        if device != "cuda":
            raise ValueError(f"the {name} profile needs a CUDA device (use --profile quick on CPU)")
        return full_profile(device) if name == "full" else headline_profile(device)
    raise ValueError(f"unknown benchmark profile {name!r}: choose quick, full, headline or auto")
