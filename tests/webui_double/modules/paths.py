"""Folder layout re-exported; mirrors modules/paths.py.

The real module also imports modules.safe (which replaces torch.load) and puts ldm / sgm /
k_diffusion on sys.path. The double does neither: see modules/safe.py for opting in.
"""
import os
import sys

from modules import paths_internal
from modules.paths_internal import models_path, script_path, data_path, extensions_dir, extensions_builtin_dir  # noqa: F401  mirrors modules/paths.py

_NAMES = ("data_path", "models_path", "extensions_dir", "default_output_dir")


def set_data_path(path, models_dir=None):  # double-only
    """Point data_path / models_path / extensions_dir at `path` in every module that copied them."""
    values = {
        "data_path": path,
        "models_path": models_dir or os.path.join(path, "models"),
        "extensions_dir": os.path.join(path, "extensions"),
        "default_output_dir": os.path.join(path, "outputs"),
    }
    for name in ("modules.paths_internal", "modules.paths", "modules.shared"):
        module = sys.modules.get(name)
        if module is None:
            continue
        for key, value in values.items():
            if hasattr(module, key) or module is paths_internal:
                setattr(module, key, value)
    os.makedirs(values["models_path"], exist_ok=True)
    return values
