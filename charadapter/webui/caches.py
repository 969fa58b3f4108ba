"""What stays in memory between generations: adapters, the image encoder, reference segmentations,
region phrases encoded on their own.

Keys are file paths and content hashes, never per-generation objects; sizes follow Settings →
Character-Adapter (settings.apply_cache_settings).
"""

from typing import Any

from ..cache import BoundedCache

DEFAULT_SEGMENTATION_CACHE = 16  # segmented references (a few MB each: masks and region tokens)
DEFAULT_ADAPTERS_LOADED = 2  # IP-Adapter weights in memory (SD1.5 ~ 40 MB to SDXL plus ~ 850 MB)
MAX_CACHE_SIZE = 256

ADAPTER_CACHE = BoundedCache(DEFAULT_ADAPTERS_LOADED)  # path -> IPAdapterWeights
ENCODER_CACHE = BoundedCache(1)  # path -> CLIP vision model
SEGMENTATION_CACHE = BoundedCache(DEFAULT_SEGMENTATION_CACHE)  # reference + phrases + model -> masks
REFERENCE_CACHE = BoundedCache(DEFAULT_SEGMENTATION_CACHE)  # the same + adapter + encoder -> Reference
PHRASE_CACHE = BoundedCache(64)  # phrase + checkpoint + text settings -> its own token rows (a few KB each)


def cache_size(value: Any, default: int) -> int:
    """A cache size from Settings (a number, maybe as text or float); `default` when unusable."""
    try:
        size = int(float(value))
    except (TypeError, ValueError):
        return default
    return min(max(size, 0), MAX_CACHE_SIZE)


def resize(segmentations: Any, adapters: Any) -> None:
    """Set the capacities from the two Settings values (references follow the segmentations)."""
    references = cache_size(segmentations, DEFAULT_SEGMENTATION_CACHE)
    SEGMENTATION_CACHE.capacity = REFERENCE_CACHE.capacity = references
    ADAPTER_CACHE.capacity = cache_size(adapters, DEFAULT_ADAPTERS_LOADED)
