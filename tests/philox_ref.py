"""numpy Philox4x32-10 and the dropout keep-mask both kernel backends draw (checked against Random123's
known answers in test_cuda_backend.py)."""
import math

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


def drop_threshold(p):
    """The 16-bit keep threshold of dropout rate ``p``: ``round(p * 2**16)`` (halves away from zero, as
    ``std::round``), at most ``2**16 - 1``."""
    return min(math.floor(p * 2 ** 16 + 0.5), 2 ** 16 - 1)


def keep_scale(p):
    """What the kernels multiply a kept element by: the inverse of the keep rate the 16-bit threshold realises,
    ``2**16 / (2**16 - t)`` (not ``1 / (1 - p)``: unbiased at every rate)."""
    return 2 ** 16 / (2 ** 16 - drop_threshold(p))


def block_of(i, j):
    """Element ``(i, j)``'s Philox call and word (numpy int arrays): ``(c0, c1, word)``, the counter's first two
    words ``4 (j / 16) + (j / 2) % 4`` and ``8 (i / 16) + i % 8`` and the word ``2 ((i / 8) % 2) + (j / 8) % 2``."""
    i, j = np.asarray(i), np.asarray(j)
    return 4 * (j >> 4) + ((j >> 1) & 3), 8 * (i >> 4) + (i & 7), 2 * ((i >> 3) & 1) + ((j >> 3) & 1)


def keep_of(seed, offset, bh, i, j, p):
    """The kernels' dropout decision for elements ``(bh, i, j)`` (numpy int arrays of one shape).  One Philox call
    serves a 2 x 4 block, queries ``i, i + 8`` (``i % 16 < 8``) by keys ``j, j + 1, j + 8, j + 9`` (``j % 16 < 8``,
    even): the 8 elements one lane holds in the MMA accumulator layout of a 16 x 16 tile.  Counter ``{4 (j / 16) + (j
    / 2) % 4, 8 (i / 16) + i % 8, bh, offset}``, key ``seed``; element ``(i, j)`` takes word ``2 ((i / 8) % 2) + (j /
    8) % 2``, its 16-bit half ``j % 2`` (low for even ``j``), kept iff the half is ``>= round(p * 2**16)``."""
    c0, c1, word = block_of(i, j)
    words = philox4x32_10([c0, c1, bh, np.full_like(c0, offset & 0xFFFFFFFF)],
                          (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    w = np.choose(word, words)
    half = np.where((j & 1) == 1, w >> np.uint64(16), w & np.uint64(0xFFFF))
    return half >= drop_threshold(p)


def keep_mask(seed, offset, B, H, Lq, Lk, p):
    """The kernels' dropout mask ``[B, H, Lq, Lk]`` (bool; :func:`keep_of` with ``bh = b * H + h``)."""
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(Lq), np.arange(Lk), indexing="ij")
    return torch.from_numpy(keep_of(seed, offset, bh, i, j, p).reshape(B, H, Lq, Lk))
