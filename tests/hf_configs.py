"""Small HF DeBERTa configs covering every attention variant (shared by tests)."""
import itertools

import pytest

transformers = pytest.importorskip("transformers")


def v2_config(pos_att_type=("p2c", "c2p"), share_att_key=True, position_buckets=4, max_relative_positions=8,
              relative_attention=True, hidden=32, heads=2, layers=2, conv=0, norm_rel_ebd="layer_norm", **kw):
    return transformers.DebertaV2Config(
        vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=48, max_position_embeddings=64, relative_attention=relative_attention,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions,
        pos_att_type=list(pos_att_type), share_att_key=share_att_key, norm_rel_ebd=norm_rel_ebd,
        position_biased_input=False, conv_kernel_size=conv,
        **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "type_vocab_size": 0, **kw})


def v1_config(pos_att_type=("c2p", "p2c"), max_relative_positions=8, relative_attention=True, hidden=32, heads=2,
              layers=2, **kw):
    return transformers.DebertaConfig(
        vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=48, max_position_embeddings=64, relative_attention=relative_attention,
        max_relative_positions=max_relative_positions, pos_att_type=list(pos_att_type),
        **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "type_vocab_size": 0, **kw})


POS_TYPES = [("c2p",), ("p2c",), ("p2c", "c2p"), ()]

#: (pos_att_type, share_att_key, position_buckets, max_relative_positions)
V2_VARIANTS = [
    *[(t, s, 4, 8) for t, s in itertools.product(POS_TYPES, (True, False))],
    (("p2c", "c2p"), True, -1, 6),     # no buckets
    (("p2c", "c2p"), False, -1, 6),
    (("c2p",), True, 8, 16),
    (("p2c", "c2p"), True, 256, 512),  # DeBERTa-v3's settings
]
