"""Device name and software versions recorded with every result."""
from __future__ import annotations

import functools
import importlib
import platform

from deberta_fast._env import cpu_name as _cpu_name


def _version(mod: str):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "installed")
    except Exception:
        try:
            from importlib.metadata import version

            return version(mod)
        except Exception:
            return None


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    import os

    import torch

    env = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        env["device"] = f"CPU {_cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    from importlib.metadata import PackageNotFoundError, version

    for dist, mod in (("triton", "triton"), ("transformers", "transformers"), ("deberta_fast", "deberta_fast"),
                      ("disentangled-flash", "disentangled_flash"), ("flashdeberta", "flashdeberta")):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = _version(mod)
    return env


def device_slug(env: dict) -> str:
    import re

    name = env["device"]
    if name.startswith("CPU"):
        name = "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
