"""Loading script files; mirrors modules/script_loading.py."""
import importlib.util
import os

loaded_scripts = {}  # mirrors modules/script_loading.py (loaded_scripts)


def load_module(path):  # mirrors modules/script_loading.py (load_module)
    """Execute a file as a module named after its base name (e.g. 'xyz_grid.py'); not put in sys.modules."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
