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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    init = os.path.join(folder, "__init__.py")
    # a source checkout (setup.py beside the package) always uses its own kernels/, even when
    # another copy of deberta_fast is installed (e.g. editable from a different clone)
    from_checkout = os.path.exists(init) and os.path.exists(os.path.join(root, "setup.py"))
    if _NAME in sys.modules or (not from_checkout and importlib.util.find_spec(_NAME) is not None):
        return
    if not from_checkout:
        return
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    parent = sys.modules.get("deberta_fast")
    if parent is not None:
        parent._kernels = module
