"""A small bounded cache: reference segmentations and loaded adapters are paid for once."""

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """Least-recently-used mapping that never holds more than `capacity` entries."""

    def __init__(self, capacity: int, on_evict: Optional[Callable[[V], None]] = None):
        self._items: "OrderedDict[Hashable, V]" = OrderedDict()
        self._on_evict = on_evict
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if int(value) < 0:
            raise ValueError(f"cache capacity must be >= 0, got {value}")
        self._capacity = int(value)
        self._shrink()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Optional[V]:
        """The cached value (now most recently used), or None."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def get_or_create(self, key: Hashable, create: Callable[[], V]) -> V:
        """The cached value, or `create()` stored under `key` (not stored when it raises)."""
        value = self.get(key)
        if value is None:
            value = create()
            self.put(key, value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._shrink()

    def clear(self) -> None:
        while self._items:
            self._evict_oldest()

    def _shrink(self) -> None:
        while len(self._items) > self._capacity:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, value = self._items.popitem(last=False)
        if self._on_evict is not None:
            self._on_evict(value)
