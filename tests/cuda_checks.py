"""Checks shared by the cuda backend's GPU tests (tests/test_cuda_backend.py, tests/test_cuda_varlen.py)."""
import torch

from deberta_fast import _cuda_ext


def _want() -> str:
    wg = _cuda_ext.wgmma_requested() and (_cuda_ext.simulating() or torch.cuda.get_device_capability()[0] == 9)
    return "mma.sync" if not wg else "wgmma serial" if _cuda_ext.wgmma_serial() else "wgmma"


def assert_fwd_kernel():
    """The forward ran the kernel asked for: with ``DEBERTA_FAST_CUDA_WGMMA=1`` its wgmma variant (the simulator, or
    an sm_90 device: the extension's sm_90a build), else the mma.sync kernel.  Then resets the record, so that the
    next check needs a launch of its own."""
    kind = _cuda_ext.last_fwd_kernel()
    _cuda_ext.reset_last_kernels()
    assert kind == _want()


def assert_bwd_kernel():
    """The same for the backward's score kernels (one wgmma variant: ``serial`` is the forward's)."""
    kind = _cuda_ext.last_bwd_kernel()
    _cuda_ext.reset_last_kernels()
    assert kind == _want().replace("wgmma serial", "wgmma")
