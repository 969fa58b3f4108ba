"""Folder layout; mirrors modules/paths_internal.py.

The real module derives everything from --data-dir / --models-dir at import. The double starts
in a fresh temporary folder (or $WEBUI_DOUBLE_DATA_DIR) and tests move it with
`modules.paths.set_data_path` (double-only).
"""
import os
import tempfile

modules_path = os.path.dirname(os.path.realpath(__file__))  # mirrors modules/paths_internal.py (modules_path)
script_path = os.path.dirname(modules_path)  # mirrors modules/paths_internal.py (script_path): the WebUI root

data_path = os.environ.get("WEBUI_DOUBLE_DATA_DIR") or tempfile.mkdtemp(prefix="webui_double_")  # mirrors (data_path)
models_path = os.path.join(data_path, "models")  # mirrors (models_path): --models-dir or <data_path>/models
extensions_dir = os.path.join(data_path, "extensions")  # mirrors (extensions_dir)
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")  # mirrors (extensions_builtin_dir)
default_output_dir = os.path.join(data_path, "outputs")  # mirrors (default_output_dir)
sd_configs_path = os.path.join(script_path, "configs")  # mirrors (sd_configs_path)
