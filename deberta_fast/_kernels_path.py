"""Makes ``deberta_fast._kernels`` importable from a source checkout.

Installed wheels map the top-level ``kernels/`` folder to ``deberta_fast._kernels``
(``package_dir`` in setup.py).  Running from a checkout without installing, this
registers the same folder under that name.
"""
import importlib.util
import os
import sys

_NAME = "deberta_fast._kernels"


def ensure_kernels_package() -> None:
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    parent = sys.modules.get("deberta_fast")
    if parent is not None:
        parent._kernels = module
