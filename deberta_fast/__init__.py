"""deberta_fast: fast, exact DeBERTa disentangled attention.

    from deberta_fast import disentangled_attention, DisentangledAttention, patch, unpatch, patched
"""
from ._kernels_path import ensure_kernels_package

ensure_kernels_package()

from .dispatch import (  # noqa: E402
    BackendUnavailableError, disentangled_attention, disentangled_attention_varlen, last_backend)
from .positions import relative_slot_table  # noqa: E402
from .reference import disentangled_attention_reference  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "disentangled_attention",
    "disentangled_attention_varlen",
    "disentangled_attention_reference",
    "last_backend",
    "relative_slot_table",
    "BackendUnavailableError",
]

from .hf_attention import CANONICAL  # noqa: E402
from .module import DisentangledAttention  # noqa: E402
from .patching import is_patched, patch, patch_transformers, patched, unpatch, unpatch_transformers  # noqa: E402

__all__ += ["DisentangledAttention", "patch", "unpatch", "patched", "is_patched", "patch_transformers",
            "unpatch_transformers", "CANONICAL"]
