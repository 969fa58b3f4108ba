"""The attn2 layer table: every cross-attention layer of the UNet, in IP-Adapter key order.

IP-Adapter files number their layers the way diffusers' ``UNet2DConditionModel.attn_processors``
lists them: down blocks (ldm ``input_blocks``), then up blocks (``output_blocks``), then the mid
block (``middle_block``); attn1 takes the even numbers, attn2 the odd ones, so the i-th attn2
layer pairs with ``ip_adapter.{2i+1}``. Works on the ldm UNet (SD1.x/2.x) and on the sgm UNet
(SDXL) without importing either: attn2 is found by its module path and duck-typed attributes.
"""

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CharacterAdapterError, CheckpointError

_ATTN2_PATH = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn2$")
_ATTN2_ATTRS = ("to_q", "to_k", "to_v", "to_out", "heads")
_BLOCK_ORDER = ("input_blocks", "output_blocks", "middle_block")  # diffusers: down, up, mid


@dataclass(frozen=True, eq=False)
class AttnLayer:
    """One attn2 layer: where it is, its sizes and its UNet level (downsamplings above it)."""

    index: int            # position in IP-Adapter order; file key ip_adapter.{2*index+1}
    name: str             # qualified module name inside the UNet
    module: nn.Module     # the attn2 module (ldm or sgm CrossAttention)
    heads: int            # H
    inner_dim: int        # C_inner = H*D, out_features of to_q
    context_dim: int      # in_features of to_k (768 SD1.5, 1024 SD2, 2048 SDXL)
    level: int            # grid = latent grid halved (ceil) `level` times

    @property
    def ip_key(self) -> str:
        """The IP-Adapter key prefix of this layer."""
        return f"ip_adapter.{2 * self.index + 1}"

    @property
    def head_dim(self) -> int:
        """D = C_inner / H."""
        return self.inner_dim // self.heads


def _is_resampler(module: nn.Module, suffix: str) -> bool:
    """True when the module is, or contains, a module whose class name ends with `suffix`."""
    return any(type(m).__name__.endswith(suffix) for m in module.modules())


def _attn2_in(prefix: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """attn2 modules under `module`, in registration (= forward) order, with qualified names."""
    found = []
    for sub_name, sub in module.named_modules(prefix=prefix):
        if not _ATTN2_PATH.search(sub_name):
            continue
        missing = [a for a in _ATTN2_ATTRS if not hasattr(sub, a)]
        if missing:
            raise CharacterAdapterError(
                f"{sub_name} ({type(sub).__name__}) looks like attn2 but lacks {missing}; "
                f"expected a CrossAttention with {list(_ATTN2_ATTRS)}"
            )
        found.append((sub_name, sub))
    return found


def _walk(prefix: str, block: nn.Module, level: int, step: int, suffix: Optional[str], out: dict) -> int:
    """Record attn2 layers of one UNet block at the current level; return the level after it.

    Children of a block run in registration order, so an attn2 before a Downsample/Upsample
    child sits on the grid before the resampling.
    """
    for child_name, child in block.named_children():
        for name, module in _attn2_in(f"{prefix}.{child_name}", child):
            out[name] = (module, level)
        if suffix is not None and _is_resampler(child, suffix):
            level += step
    return level


def find_attn2_layers(unet: nn.Module) -> List[AttnLayer]:
    """The attn2 layers of an ldm/sgm UNetModel in IP-Adapter order, with sizes and levels."""
    missing = [b for b in _BLOCK_ORDER if not hasattr(unet, b)]
    if missing:
        children = [n for n, _ in unet.named_children()]
        raise CharacterAdapterError(
            f"expected a UNetModel with input_blocks, middle_block and output_blocks; "
            f"{type(unet).__name__} lacks {missing} (children: {children})"
        )
    found: dict = {}
    level = 0
    for i, block in enumerate(unet.input_blocks):
        level = _walk(f"input_blocks.{i}", block, level, +1, "Downsample", found)
    bottom = level
    level = _walk("middle_block", unet.middle_block, level, 0, None, found)
    for i, block in enumerate(unet.output_blocks):
        level = _walk(f"output_blocks.{i}", block, level, -1, "Upsample", found)
    if level != 0:
        raise CharacterAdapterError(
            f"UNet {type(unet).__name__} has {bottom} downsamplings in input_blocks but the "
            f"output_blocks end at level {level}, expected 0"
        )
    if not found:
        raise CharacterAdapterError(
            f"no attn2 layers (transformer_blocks.<j>.attn2) found in {type(unet).__name__}: "
            f"the UNet is not an ldm/sgm UNetModel with cross-attention (replaced by another extension?)"
        )
    ordered = [n for part in _BLOCK_ORDER for n in found if n.startswith(part + ".")]
    layers = []
    for index, name in enumerate(ordered):
        module, lvl = found[name]
        inner = int(module.to_q.weight.shape[0])
        heads = int(module.heads)
        if inner % heads:
            raise CharacterAdapterError(f"{name}: to_q width {inner} is not divisible by heads={heads}")
        layers.append(AttnLayer(
            index=index, name=name, module=module, heads=heads, inner_dim=inner,
            context_dim=int(module.to_k.weight.shape[1]), level=lvl,
        ))
    return layers


def check_adapter_layers(
    layers: Sequence[AttnLayer], kv_weights: Sequence[Tuple[torch.Tensor, torch.Tensor]], source: str = "",
) -> None:
    """Raise CheckpointError unless the adapter has one (to_k_ip, to_v_ip) per layer with fitting shapes."""
    where = f" in {source}" if source else ""
    if len(kv_weights) != len(layers):
        raise CheckpointError(
            f"the IP-Adapter{where} has {len(kv_weights)} attn2 layers, the UNet has {len(layers)} "
            f"(SD1.x: 16, SDXL: 70): adapter and checkpoint architectures differ"
        )
    for layer, (wk, wv) in zip(layers, kv_weights):
        want = (layer.inner_dim, layer.context_dim)
        for tag, w in (("to_k_ip", wk), ("to_v_ip", wv)):
            if tuple(w.shape) != want:
                raise CheckpointError(
                    f"{layer.ip_key}.{tag}.weight{where} has shape {tuple(w.shape)}, "
                    f"UNet layer {layer.name} needs {want} (inner_dim, context_dim)"
                )


# 32x32 and 16x16 at 512 px on SD1.5, 64x64 and 32x32 at 1024 px on SDXL: the levels whose
# text attention localises phrases (coarser maps are near chance, finer ones are noisy).
DEFAULT_MAP_LEVELS = (1, 2)


def map_layers(layers: Sequence[AttnLayer], levels: Sequence[int] = DEFAULT_MAP_LEVELS) -> List[AttnLayer]:
    """Layers whose text maps locate phrases: those at `levels`, else the finest level present."""
    chosen = [layer for layer in layers if layer.level in levels]
    if not chosen and layers:
        finest = min(layer.level for layer in layers)
        chosen = [layer for layer in layers if layer.level == finest]
    return chosen
