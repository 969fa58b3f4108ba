"""Peak bytes of the tensors a block of code creates: a probe for working memory that does not
depend on the machine (no RSS, no allocator caches), used by the tests and `bench_pass`.

Every aten op run inside ``with LiveTensorBytes() as probe:`` goes through the probe (a
TorchDispatchMode); each new storage an op returns is counted until the last tensor object on it
is freed. Works on any device, the meta device included, so a real-size UNet can be measured
without allocating it. Not seen: buffers an op allocates and frees internally (an SDPA kernel's
scratch, oneDNN workspaces) and memory outside torch.
"""

import weakref
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by storages created inside the block: `current` now, `peak` the maximum."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.ops = 0
        self._live: Dict[int, List[int]] = {}  # storage id -> [nbytes, live tensor objects]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        given = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, given)
        return out

    def _track(self, tensor: torch.Tensor, given: set) -> None:
        key = _storage_key(tensor)
        entry = self._live.get(key)
        if entry is None:
            if key in given:  # an in-place op or a view of something made before the block
                return
            entry = self._live[key] = [tensor.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage under `tensor` (its StorageImpl; also unique on the meta device)."""
    return tensor.untyped_storage()._cdata
