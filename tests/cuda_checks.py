"""Checks shared by the cuda backend's GPU tests (tests/test_cuda_backend.py, tests/test_cuda_varlen.py)."""
import torch

from deberta_fast import _cuda_ext


def assert_fwd_kernel():
    """The forward ran the kernel asked for: with ``DEBERTA_FAST_CUDA_WGMMA=1`` its wgmma variant (the simulator, or
    an sm_90 device: the extension's sm_90a build), else the mma.sync kernel."""
    wg = _cuda_ext.wgmma_requested() and (_cuda_ext.simulating() or torch.cuda.get_device_capability()[0] == 9)
    assert _cuda_ext.last_fwd_kernel() == ("wgmma" if wg else "mma.sync")
