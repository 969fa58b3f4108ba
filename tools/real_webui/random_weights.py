"""Random-valued weights for big models, streamed into a .safetensors file one block at a time.

The model is built on the meta device (no memory); then each block small enough to hold is given
real storage, torch's default init (`reset_parameters`) plus the caller's own init, is cast to
the file's dtype, written at its place in the file and freed. Peak memory is one block, not the
model: an SDXL checkpoint (3.5 G parameters, 14 GB in fp32) is made with a 1.2 GB peak, which
matters on a machine shared with other jobs. Every tensor is first filled with NaN (integers
with their minimum), so a tensor that no init reached stops the run instead of being written.

Tensors are written in `state_dict()` order, with the file's header made from the meta shapes.
"""
import ctypes
import json
import os
import struct
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

Layout = List[Tuple[str, torch.dtype, Tuple[int, ...]]]
FileDtype = Callable[[str, torch.Tensor], torch.dtype]
Init = Callable[[str, torch.nn.Module], None]


def fp16_weights(key: str, tensor: torch.Tensor) -> torch.dtype:
    """Floating tensors in fp16, the rest as they are (what pruned fp16 checkpoints hold)."""
    return torch.float16 if tensor.is_floating_point() else tensor.dtype


class StreamedSafetensors:
    """A .safetensors file written tensor by tensor, in the order of a layout fixed up front."""

    def __init__(self, path: str, layout: Layout, metadata: Optional[Dict[str, str]] = None):
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, dtype, shape in layout:
            size = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                size *= s
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format pads the header so that the data starts 8-aligned
        self._layout = layout
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))  # header length, little-endian u64
        self._file.write(raw)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout (name, dtype and shape must match)."""
        want_key, want_dtype, want_shape = self._layout[self._next]
        if (key, tensor.dtype, tuple(tensor.shape)) != (want_key, want_dtype, tuple(want_shape)):
            raise ValueError(f"expected {want_key} {want_dtype} {tuple(want_shape)}, "
                             f"got {key} {tensor.dtype} {tuple(tensor.shape)}")
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
        self._next += 1

    def abort(self) -> None:
        """Close and delete the unfinished file (a half-written checkpoint must not be listed)."""
        self._file.close()
        os.remove(self._file.name)

    def close(self) -> None:
        """Close the file; every tensor of the layout must have been written."""
        self._file.close()
        if self._next != len(self._layout):
            raise ValueError(f"{len(self._layout) - self._next} tensors never written, "
                             f"first {self._layout[self._next][0]}")


def _numel(module: torch.nn.Module) -> int:
    """Elements of every parameter and buffer under the module."""
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def blocks(module: torch.nn.Module, limit: int, prefix: str = "") -> Iterator[Tuple[str, torch.nn.Module, bool]]:
    """(prefix, module, whole) in state_dict order: a whole subtree when it holds at most `limit`
    elements, else the module's own tensors (whole=False) and then its children, recursively."""
    if _numel(module) <= limit:
        yield prefix, module, True
        return
    yield prefix, module, False
    for name, child in module._modules.items():
        if child is not None:
            yield from blocks(child, limit, prefix + name + ".")


def _own_modules(module: torch.nn.Module, whole: bool, prefix: str) -> List[Tuple[str, torch.nn.Module]]:
    """(qualified name, module) of what one block covers, parents before children."""
    if not whole:
        return [(prefix.rstrip("."), module)]
    return [((prefix + name).rstrip("."), m) for name, m in module.named_modules()]


def _materialise(module: torch.nn.Module) -> None:
    """Give the module's own parameters and buffers real CPU storage filled with a sentinel."""
    for table in (module._parameters, module._buffers):
        for name, t in list(table.items()):
            if t is None:
                continue
            dtype = torch.float32 if t.is_floating_point() else t.dtype
            value = torch.empty(t.shape, dtype=dtype)
            value.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
            table[name] = torch.nn.Parameter(value, t.requires_grad) if table is module._parameters else value


def default_init(module: torch.nn.Module) -> None:
    """Torch's own init for the module's own tensors (Linear, Conv, norms, Embedding, MHA)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        module._reset_parameters()
    elif callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()


def _check_filled(key: str, t: torch.Tensor) -> None:
    """Refuse a tensor still holding the sentinel: no init reached it."""
    left = torch.isnan(t).any() if t.is_floating_point() else (t == torch.iinfo(t.dtype).min).any()
    if bool(left):
        raise ValueError(f"{key}: no init filled this tensor (add a rule for it)")


def _no_heap_growth() -> None:
    """Blocks over 4 MB get their own mmap (glibc), so freed blocks go back to the system instead
    of fragmenting the heap (seen: 3.1 GB peak for SDXL without this, 1.2 GB with it)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass  # not glibc: only the peak changes


def write_random(model: torch.nn.Module, path: str, init: Optional[Init] = None,
                 file_dtype: FileDtype = fp16_weights, limit: int = 50_000_000,
                 metadata: Optional[Dict[str, str]] = None, skip: Sequence[str] = ()) -> int:
    """Write random weights for a meta-device model to `path`; returns the number of tensors.

    Each block gets default_init, then `init(qualified_name, module)` for every module it covers
    (parents first, so a child's own rule wins). Keys starting with a `skip` prefix are not written.
    """
    meta = model.state_dict()
    layout: Layout = []
    for key, t in meta.items():
        if not key.startswith(tuple(skip)):
            layout.append((key, file_dtype(key, t), tuple(t.shape)))
    _no_heap_growth()
    writer = StreamedSafetensors(path, layout, metadata)
    seen = set()
    try:
        with torch.no_grad():
            for prefix, block, whole in blocks(model, limit):
                members = _own_modules(block, whole, prefix)
                for name, m in members:
                    if id(m) in seen:
                        raise ValueError(f"{name}: module reached twice (tied weights are not supported)")
                    seen.add(id(m))
                    _materialise(m)
                    default_init(m)
                for name, m in members:
                    if init is not None:
                        init(name, m)
                state = block.state_dict(prefix=prefix) if whole else {
                    prefix + k: v for k, v in block.state_dict().items() if "." not in k}
                for key, t in state.items():
                    if key.startswith(tuple(skip)):
                        continue
                    _check_filled(key, t)
                    writer.put(key, t.to(file_dtype(key, t)))
                block.to(device="meta")  # frees the block's storage
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return len(layout)


def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
    """Fill in place with N(mean, std^2)."""
    torch.nn.init.normal_(t, mean=mean, std=std)


def tame_layer_norm(norm: torch.nn.Module, seed: int) -> None:
    """A trained-looking LayerNorm: weight 1 +- 0.1, bias 0.5 +- 0.1 (see tests/tiny_sd.py
    tame_final_layer_norm: a zero-bias final norm makes the WebUI's Original emphasis divide
    rounding noise by rounding noise)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=gen))
    norm.bias.copy_(0.5 + 0.1 * torch.randn(norm.bias.shape, generator=gen))
