"""Gradient checks of the low-precision GPU tests against the float64 reference."""
from __future__ import annotations

#: a gradient's error is taken relative to its own largest entry, or to this fraction of the call's largest
#: gradient entry when its own is smaller: with one key (Lk = 1) the exact dq, dk and position gradients are 0
#: (the softmax of one score is 1 whatever the score), and the kernels' rounding (delta = rowsum(dO * O) against
#: dP = dO . V, 1 ulp apart) would otherwise be divided by ~1e-16
FLOOR = 1e-3


def assert_grads_close(grads, ref_grads, names, tol: float) -> None:
    """``max |g - g_ref| / max(max |g_ref|, FLOOR * the call's largest |g_ref|) < tol`` for every gradient;
    NaN never passes."""
    whole = max(rg.abs().max().item() for rg in ref_grads)
    for name, g, rg in zip(names, grads, ref_grads):
        scale = max(rg.abs().max().item(), FLOOR * whole, 1e-30)
        err = (g.double() - rg).abs().max().item() / scale
        assert err < tol, f"d{name}: relative max error {err:.3g} (scale {scale:.3g})"
