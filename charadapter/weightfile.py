"""Reading weight files safely: safetensors, or torch pickles through weights_only only."""

import json
import os
import pickle
import re
import struct
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from .errors import CheckpointError

# how torch's weights-only unpickler words a refused object (torch 2.0 .. 2.x), as opposed to
# bytes that are no pickle at all ("Unsupported operand")
_REFUSAL = re.compile(r"GLOBAL|unsupported class|unrecognized function|can only build|is blocked", re.I)


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit

# safetensors dtype names -> torch dtypes read here; others go through the library
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors_header(path: str, needles: Sequence[bytes] = ()) -> Optional[Dict[str, Dict[str, Any]]]:
    """Tensor name -> {dtype, shape, data_offsets} from the JSON header; None if unreadable.

    With `needles`, a header containing none of them is returned as {} without parsing it
    (a folder of ControlNet models is then skimmed, not parsed).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)  # header length, little-endian u64
            if size < 2 or size > MAX_HEADER_BYTES or size > os.fstat(f.fileno()).st_size - 8:
                return None
            raw = f.read(size)
        if needles and not any(n in raw for n in needles):
            return {}
        header = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(header, dict):
        return None
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _entries(header: Dict[str, Dict[str, Any]], data_bytes: int) -> Optional[list]:
    """(start, stop, name, dtype, shape) of every tensor, in file order; None where an entry is not
    the plain kind this module reads (unknown dtype, sizes that do not add up, data past the end)."""
    entries = []
    for name, info in header.items():
        dtype, shape, offsets = _DTYPES.get(info.get("dtype")), info.get("shape"), info.get("data_offsets")
        if (dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) and n >= 0 for n in shape + offsets)):
            return None
        numel = 1
        for n in shape:
            numel *= n
        start, stop = offsets
        if stop - start != numel * torch.empty((), dtype=dtype).element_size() or stop > data_bytes:
            return None
        entries.append((start, stop, name, dtype, shape))
    return sorted(entries, key=lambda e: e[0])


def _read_tensors(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """Every tensor of a safetensors file, each read into memory of its own; None where the file is
    not the plain kind (see _entries) or the machine is big-endian: the library then decides.

    The library maps the file and hands out views of the mapping, so a loader that converts each
    tensor (fp16 file -> fp32 model) keeps the whole file resident beside the model until the last
    tensor goes; tensors of their own are freed one by one as they are converted.
    """
    header = read_safetensors_header(path)
    if header is None or sys.byteorder != "little":
        return None
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))  # header length, little-endian u64
        entries = _entries(header, os.fstat(f.fileno()).st_size - 8 - size)
        if entries is None:
            return None
        out = {}
        for start, stop, name, dtype, shape in entries:
            tensor = torch.empty(shape, dtype=dtype)
            if stop > start:
                f.seek(8 + size + start)
                if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != stop - start:
                    return None
            out[name] = tensor
    return out


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Flat dict of tensors, each in memory of its own (see _read_tensors); a damaged file becomes
    CheckpointError."""
    from safetensors.torch import load_file

    try:
        tensors = _read_tensors(path)
        return tensors if tensors is not None else load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (not importable on every version)
        raise CheckpointError(
            f"{path}: not a readable .safetensors file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _refused_global(message: str) -> str:
    """The object torch's weights-only unpickler refused, from its error message."""
    m = re.search(r"(?:GLOBAL|Unsupported class|unrecognized function) (\S+)", message)
    return f"found {m.group(1)}" if m else "found a non-tensor object"


def _last_line(message: str) -> str:
    """The most specific line of torch's multi-line load errors."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and "documentation" not in ln]
    return lines[-1] if lines else message


def read_pickle(path: str) -> Any:
    """Unpickle tensors and plain containers only; anything else is refused, nothing runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _REFUSAL.search(str(e)):
            # no plain tensor pickle (an HTML error page, a cut-off legacy file): nothing ran
            raise CheckpointError(
                f"{path}: not a readable PyTorch file (truncated or corrupt?): {_last_line(str(e))}"
            ) from e
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): the file contains pickled code/objects "
            f"other than tensors, which could run code when loaded ({_refused_global(str(e))}). "
            f"Use a .safetensors copy."
        ) from e
    except Exception as e:  # zip/stream errors of a truncated or foreign file
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if obj is None:
        # inside the WebUI torch.load is its safe unpickler, which logs a refusal and returns None
        raise CheckpointError(
            f"{path}: torch.load returned None (the WebUI's safe unpickler refused the file?); "
            "convert it to .safetensors")
    return obj
