"""A tiny DeBERTaV3 replaced-token-detection (RTD) pre-training loop through deberta_fast.

Generator (masked LM) and discriminator share token embeddings with *gradient-disentangled embedding
sharing* (GDES): the discriminator embeds with ``E_gen.detach() + E_delta``, so its RTD loss never pushes
the generator's embeddings.  Both encoders are patched, so every attention runs in the fused kernels on
a GPU (or the reference on CPU).

    python examples/rtd_pretrain_step.py --steps 5
"""
import argparse

import torch
import torch.nn.functional as F
import transformers

import deberta_fast


def config(hidden, layers, heads, vocab):
    return transformers.DebertaV2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=512, relative_attention=True, position_buckets=256,
        max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0)


class RTD(torch.nn.Module):
    def __init__(self, vocab=1000, hidden=64, mask_id=3):
        super().__init__()
        self.mask_id = mask_id
        self.generator = transformers.DebertaV2ForMaskedLM(config(hidden, 1, 4, vocab))
        self.discriminator = transformers.DebertaV2Model(config(hidden, 2, 4, vocab))
        self.delta = torch.nn.Parameter(torch.zeros(vocab, hidden))  # GDES residual, zero-init
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, ids, mask, mask_prob=0.15):
        masked = (torch.rand(ids.shape, device=ids.device) < mask_prob) & mask.bool()
        gen_in = ids.masked_fill(masked, self.mask_id)
        labels = ids.masked_fill(~masked, -100)
        gen = self.generator(input_ids=gen_in, attention_mask=mask, labels=labels)
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=gen.logits[masked].float()).sample()
        disc_ids = ids.clone()
        disc_ids[masked] = sampled
        replaced = (disc_ids != ids).float()
        emb = self.generator.deberta.embeddings.word_embeddings.weight.detach() + self.delta  # GDES
        hidden = self.discriminator(inputs_embeds=F.embedding(disc_ids, emb), attention_mask=mask).last_hidden_state
        logits = self.head(hidden).squeeze(-1)
        rtd = F.binary_cross_entropy_with_logits(logits[mask.bool()], replaced[mask.bool()])
        return gen.loss, rtd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=40)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = RTD().to(device).train()
    deberta_fast.patch(model)  # patches both the generator's and the discriminator's encoder
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        lens = torch.randint(args.max_len // 2, args.max_len + 1, (args.batch,))
        mask = (torch.arange(args.max_len)[None] < lens[:, None]).long().to(device)
        ids = torch.randint(5, 1000, (args.batch, args.max_len), device=device) * mask
        mlm, rtd = model(ids, mask)
        loss = mlm + 50.0 * rtd
        opt.zero_grad()
        loss.backward()
        gen_emb_grad = model.generator.deberta.embeddings.word_embeddings.weight.grad
        opt.step()
        print(f"step {step}: mlm={mlm.item():.4f} rtd={rtd.item():.4f} backend={deberta_fast.last_backend()} "
              f"delta|grad|={model.delta.grad.norm().item():.3e} gen-emb|grad|={gen_emb_grad.norm().item():.3e}")


if __name__ == "__main__":
    main()
