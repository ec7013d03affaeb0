"""Fine-tune a small DeBERTa-v3-shaped classifier (random init, synthetic task) with and without
deberta_fast, and print both loss curves side by side.

    python examples/finetune_classifier.py --steps 30            # CPU: torch reference path
    python examples/finetune_classifier.py --steps 300 --size base --dtype bf16   # on a GPU

The task: label = whether token 7 occurs in the first half of a ragged, padded sentence pair, which needs
attention across positions.  Both runs start from the same weights and see the same batches.  With
``--dropout 0`` the curves agree to float precision; with dropout they track each other statistically
(the fused path draws its own dropout masks, and the packed encoder draws them over real tokens only).
"""
import argparse
import copy

import torch
import transformers

import deberta_fast

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def v3_config(size: str, dropout: float) -> transformers.DebertaV2Config:
    return transformers.DebertaV2Config(
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        vocab_size=1000, max_position_embeddings=512, relative_attention=True, position_buckets=256,
        max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, num_labels=2, **SIZES[size])


def batches(steps, batch, max_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        lens = torch.randint(max_len // 4, max_len + 1, (batch,), generator=g)
        ids = torch.randint(8, 1000, (batch, max_len), generator=g)
        mask = (torch.arange(max_len)[None] < lens[:, None]).long()
        has = torch.rand(batch, generator=g) < 0.5
        pos = (torch.rand(batch, generator=g) * lens / 2).long()
        ids[has, pos[has]] = 7
        ids = ids * mask
        labels = ((ids[:, : max_len // 2] == 7) & (mask[:, : max_len // 2] == 1)).any(-1).long()
        yield ids.to(device), mask.to(device), labels.to(device)


def train(model, args, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step, (ids, mask, labels) in enumerate(batches(args.steps, args.batch, args.max_len, device)):
        torch.manual_seed(1000 + step)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    base = transformers.DebertaV2ForSequenceClassification(v3_config(args.size, args.dropout)).to(device).train()
    hf_model, fast_model = copy.deepcopy(base), copy.deepcopy(base)
    deberta_fast.patch(fast_model)
    hf = train(hf_model, args, device, dtype)
    fast = train(fast_model, args, device, dtype)
    print(f"device={device} dtype={args.dtype} size={args.size} backend={deberta_fast.last_backend()}")
    print(f"{'step':>5s} {'HF eager':>10s} {'deberta_fast':>13s}")
    for i, (a, b) in enumerate(zip(hf, fast)):
        print(f"{i:5d} {a:10.5f} {b:13.5f}")
    print(f"max |difference| of the loss curves: {max(abs(a - b) for a, b in zip(hf, fast)):.3e}")


if __name__ == "__main__":
    main()
