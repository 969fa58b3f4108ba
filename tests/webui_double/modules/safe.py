"""Restricted unpickling; mirrors modules/safe.py.

In the WebUI, importing modules.safe (done by modules.paths at startup) executes
`torch.load = load` for the whole process. The double does NOT do that on import, so other test
files keep the real torch.load; use `with safe.installed():` (double-only) to get WebUI behaviour.
`load` returns None (after errors.report) for a file it rejects; it never raises for that.
"""
import collections
import contextlib
import pickle
import re
import zipfile

import numpy
import torch
import _codecs

from modules import errors

TypedStorage = torch.storage.TypedStorage if hasattr(torch.storage, 'TypedStorage') else torch.storage._TypedStorage


def encode(*args):  # mirrors modules/safe.py (encode)
    return _codecs.encode(*args)


class RestrictedUnpickler(pickle.Unpickler):  # mirrors modules/safe.py (RestrictedUnpickler): an allow-list of globals
    extra_handler = None

    def persistent_load(self, saved_id):
        assert saved_id[0] == 'storage'
        try:
            return TypedStorage(_internal=True)
        except TypeError:
            return TypedStorage()

    def find_class(self, module, name):
        if self.extra_handler is not None:
            res = self.extra_handler(module, name)
            if res is not None:
                return res
        if module == 'collections' and name == 'OrderedDict':
            return getattr(collections, name)
        if module == 'torch._utils' and name in ['_rebuild_tensor_v2', '_rebuild_parameter', '_rebuild_device_tensor_from_numpy']:
            return getattr(torch._utils, name)
        if module == 'torch' and name in ['FloatStorage', 'HalfStorage', 'IntStorage', 'LongStorage', 'DoubleStorage', 'ByteStorage', 'float32', 'BFloat16Storage']:
            return getattr(torch, name)
        if module == 'torch.nn.modules.container' and name in ['ParameterDict']:
            return getattr(torch.nn.modules.container, name)
        if module == 'numpy.core.multiarray' and name in ['scalar', '_reconstruct']:
            return getattr(numpy.core.multiarray, name)
        if module == 'numpy' and name in ['dtype', 'ndarray']:
            return getattr(numpy, name)
        if module == '_codecs' and name == 'encode':
            return encode
        if module == "__builtin__" and name == 'set':
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")


# mirrors modules/safe.py (allowed_zip_names_re): note '.format_version' / '.storage_alignment'
# (written by recent torch.save) are NOT allowed, so such files are rejected
allowed_zip_names_re = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
data_pkl_re = re.compile(r"^([^/]+)/data\.pkl$")


def check_zip_filenames(filename, names):  # mirrors modules/safe.py (check_zip_filenames)
    for name in names:
        if allowed_zip_names_re.match(name):
            continue
        raise Exception(f"bad file inside {filename}: {name}")


def check_pt(filename, extra_handler):  # mirrors modules/safe.py (check_pt)
    try:
        with zipfile.ZipFile(filename) as z:
            check_zip_filenames(filename, z.namelist())
            data_pkl_filenames = [f for f in z.namelist() if data_pkl_re.match(f)]
            if len(data_pkl_filenames) == 0:
                raise Exception(f"data.pkl not found in {filename}")
            if len(data_pkl_filenames) > 1:
                raise Exception(f"Multiple data.pkl found in {filename}")
            with z.open(data_pkl_filenames[0]) as file:
                unpickler = RestrictedUnpickler(file)
                unpickler.extra_handler = extra_handler
                unpickler.load()
    except zipfile.BadZipfile:
        with open(filename, "rb") as file:
            unpickler = RestrictedUnpickler(file)
            unpickler.extra_handler = extra_handler
            for _ in range(5):
                unpickler.load()


def load(filename, *args, **kwargs):  # mirrors modules/safe.py (load): what torch.load is inside the WebUI
    return load_with_extra(filename, *args, extra_handler=global_extra_handler, **kwargs)


def load_with_extra(filename, extra_handler=None, *args, **kwargs):  # mirrors modules/safe.py (load_with_extra)
    """Check the pickle against the allow-list, then torch.load it; None (and a report) when rejected."""
    from modules import shared
    try:
        if not shared.cmd_opts.disable_safe_unpickle:
            check_pt(filename, extra_handler)
    except pickle.UnpicklingError:
        errors.report(f"Error verifying pickled file from {filename}\n-----> !!!! The file is most likely corrupted !!!! <-----", exc_info=True)
        return None
    except Exception:
        errors.report(f"Error verifying pickled file from {filename}\nThe file may be malicious, so the program is not going to read it.", exc_info=True)
        return None
    return unsafe_torch_load(filename, *args, **kwargs)


class Extra:  # mirrors modules/safe.py (Extra): temporarily allow more globals
    def __init__(self, handler):
        self.handler = handler

    def __enter__(self):
        global global_extra_handler
        assert global_extra_handler is None, 'already inside an Extra() block'
        global_extra_handler = self.handler

    def __exit__(self, exc_type, exc_val, exc_tb):
        global global_extra_handler
        global_extra_handler = None


unsafe_torch_load = torch.load  # mirrors modules/safe.py (unsafe_torch_load)
global_extra_handler = None


@contextlib.contextmanager
def installed():  # double-only: torch.load = load for the duration, as it is for the WebUI's whole life
    previous = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = previous
