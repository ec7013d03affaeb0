"""What is missing from this environment, said as its real cause and its fix.

Used by ``python -m deberta_fast`` and meant for the backends' ``unavailable()`` messages:

* :func:`explain_triton_import_error` turns the exception of a failed ``import triton`` (or of
  importing the Triton kernels) into one sentence.  Under ``TRITON_INTERPRET=1`` ``import triton``
  itself fails when numpy is missing (triton's interpreter imports numpy while decorating
  ``triton.language``); the fix is ``pip install numpy``, not ``pip install triton``.
* :func:`cuda_device_problem` says why there is no CUDA device: a CPU-only build of torch, or no
  GPU visible to a CUDA build.
* :func:`cpu_torch_hint` is the install line for a CPU-only torch (a plain ``pip install torch`` on
  Linux pulls the CUDA build, ~2.6 GB with its CUDA libraries).
"""
from __future__ import annotations

import contextlib
import platform

import importlib.metadata
import importlib.util
import os
from typing import Optional

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


#: ``os.environ``'s backing dict on POSIX (bytes keys and values; ``os.environ``'s setters write it, and a bare
#: ``os.putenv`` is seen by neither), or None elsewhere.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None
#: the variables :func:`getenv` reads (the dispatch path's ones while torch.compile traces): their keys are made at
#: import, and a name outside them is encoded per read, never cached (an insertion into :data:`_ENV_KEYS` made inside
#: a trace failed the guard dynamo puts on the dict, and every compiled function then compiled a second graph)
KNOWN_NAMES = ("TRITON_INTERPRET", "DEBERTA_FAST_CUDA_SIM", "DEBERTA_FAST_TRITON_TMA")


def _known_keys() -> dict:
    """``{name: its bytes key}`` for :data:`KNOWN_NAMES`: :data:`_ENV_KEYS`."""
    return {name: os.fsencode(name) for name in KNOWN_NAMES}


_ENV_KEYS: dict = _known_keys()


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, read from the mapping's backing dict on POSIX: ~0.1 us instead of ~0.7
    (the per-call dispatch reads two variables; measured on the 2-core CPU machine, 2026-12-05)."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name) or os.fsencode(name)
    value = _ENV_DATA.get(key)
    return default if value is None else os.fsdecode(value)


@contextlib.contextmanager
def switch(name: str, on: bool | str):
    """Within: environment variable ``name`` set to ``1`` (``on``), ``0``, or the string ``on``, restored (or removed)
    after: the experiments' switches read at each call (``DEBERTA_FAST_CUDA_WGMMA``, ``DEBERTA_FAST_TRITON_TMA``), for
    tests and benchmarks."""
    old = os.environ.get(name)
    os.environ[name] = on if isinstance(on, str) else "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value as triton 3.7 reads its flags (``1``, ``true``,
    ``on``, ``yes``, ``y``, any case; ``triton.knobs``' ``getenv_bool``)."""
    value = getenv(name)
    return value is not None and value.lower() in ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on its CPU interpreter."""
    return env_flag("TRITON_INTERPRET")


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_module(exc: BaseException) -> Optional[str]:
    """Top-level name of the module whose absence raised ``exc`` (walking ``__cause__``/``__context__``)."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError):
            name = e.name
            if not name:
                msg = str(e)
                if "No module named" in msg:
                    name = msg.split("No module named", 1)[1].strip().strip("'\"")
            if name:
                return name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def explain_triton_import_error(exc: BaseException, what: str = "triton") -> str:
    """One sentence for a failed import of triton (``what="triton"``) or of the Triton kernels
    (``what="kernels"``): the real cause first, then the fix."""
    err = f"{type(exc).__name__}: {exc}"
    missing = _missing_module(exc)
    tver = _dist_version("triton")
    if missing == "numpy":
        if interpreting():
            return (f"the Triton interpreter (TRITON_INTERPRET=1) needs numpy, which is not installed "
                    f"(triton {tver or '?'} itself is installed): pip install numpy "
                    f"(or unset TRITON_INTERPRET to run the kernels on a GPU)")
        return f"importing {what} needs numpy, which is not installed: pip install numpy ({err})"
    if missing == "triton" or (what == "triton" and tver is None and not _installed("triton")):
        return ("triton is not installed: pip install triton (Linux; CUDA builds of torch install it with "
                "themselves); without it backend='torch' serves every call")
    if missing:
        return (f"importing {what} failed because the module {missing!r} is missing ({err}); "
                f"pip install {missing}")
    if what == "kernels":
        return (f"triton {tver or '?'} is installed but the deberta_fast Triton kernels failed to import ({err}); "
                f"this triton may be too old or too new for them (tested with triton 3.6-3.7)")
    return (f"triton {tver or '?'} is installed but `import triton` failed ({err}); reinstall the triton that "
            f"matches torch {_dist_version('torch') or '?'} (pip install --force-reinstall triton==<the version "
            f"torch's wheel requires>)")


def explain_import_error(exc: BaseException, package: str, fix: str) -> str:
    """One sentence for a failed import of an optional ``package`` (e.g. transformers): which module
    is really missing (the package itself or one of its dependencies) and the fix."""
    missing = _missing_module(exc)
    if missing in (None, package.replace("-", "_")):
        if missing is None and _installed(package.replace("-", "_")):
            return f"{package} is installed but failed to import ({type(exc).__name__}: {exc})"
        return f"{package} is not installed: {fix}"
    return f"{package} is installed but its dependency {missing!r} is missing: pip install {missing}"


def triton_problem() -> Optional[str]:
    """None when triton imports here, else :func:`explain_triton_import_error` of the failure."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        return explain_triton_import_error(e)
    return None


def cuda_device_problem() -> Optional[str]:
    """None when torch sees a CUDA device, else why not (a CPU build of torch, or no visible GPU)."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f"no CUDA device: this torch ({torch.__version__}) is a CPU-only build "
                f"(the GPU backends need an NVIDIA GPU and a CUDA build of torch)")
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    extra = f"; CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else ""
    return (f"no CUDA device visible to this CUDA build of torch ({torch.__version__}, CUDA {torch.version.cuda}): "
            f"no GPU or no driver{extra}")


def cpu_torch_hint() -> str:
    """How to get a CPU-only torch (instead of the ~2.6 GB CUDA build a plain ``pip install`` brings on Linux)."""
    return f"pip install torch --index-url {CPU_TORCH_INDEX}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
