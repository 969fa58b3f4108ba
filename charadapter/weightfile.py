"""Reading weight files safely: safetensors, or torch pickles through weights_only only."""

import pickle
import re
from typing import Any, Dict

import torch

from .errors import CheckpointError

# how torch's weights-only unpickler words a refused object (torch 2.0 .. 2.x), as opposed to
# bytes that are no pickle at all ("Unsupported operand")
_REFUSAL = re.compile(r"GLOBAL|unsupported class|unrecognized function|can only build|is blocked", re.I)


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Flat dict of tensors; a damaged file becomes CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
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
