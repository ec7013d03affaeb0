"""numpy Philox4x32-10 and the dropout keep-mask both kernel backends draw (checked against Random123's
known answers in test_cuda_backend.py)."""
import numpy as np
import torch

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox4x32_10(c, key):
    """numpy Philox4x32-10; c: 4 uint64 arrays of 32-bit values, key: 2 ints."""
    m = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in c)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(W0)) & m
            k1 = (k1 + np.uint64(W1)) & m
        p0 = c0 * np.uint64(M0)
        p1 = c2 * np.uint64(M1)
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m
    return c0, c1, c2, c3


def keep_mask(seed, offset, B, H, Lq, Lk, p):
    """The kernels' dropout mask: word (j%4) of Philox({j/4, i, b*H+h, offset}, seed) >= round(p*2^32)."""
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(Lq), np.arange(Lk), indexing="ij")
    words = philox4x32_10([j >> 2, i, bh, np.full_like(j, offset & 0xFFFFFFFF)],
                          (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    w = np.choose(j & 3, words)
    thresh = min(int(round(p * 2 ** 32)), 2 ** 32 - 1)
    return torch.from_numpy((w >= thresh).reshape(B, H, Lq, Lk))
