"""Tiny random-weight UNets built from the WebUI's own `ldm` package (stable-diffusion-sdkit).

SD1.5 structure with scaled-down widths; real widths on the meta device (no memory) for the
layer table. SDXL: ldm 2.1.5's UNetModel takes one int transformer_depth, so the SDXL stand-in is
an ldm UNetModel with SDXL's level layout whose SpatialTransformers get SDXL's per-level depths
by deepening `transformer_blocks` (same module names as sgm's UNet; structure only, not run).
"""

import copy
import math

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel

SD15_DEPTH_LAYOUT = dict(
    image_size=32, in_channels=4, out_channels=4, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    use_checkpoint=False, legacy=False, use_linear_in_transformer=False,
)
# SDXL: no attention at level 0, depth 2 at level 1, 10 at level 2 and in the middle
SDXL_DEPTHS = {1: 2, 2: 10}
SDXL_MID_DEPTH = 10


def sd15_unet(model_channels: int = 32, context_dim: int = 32, seed: int = 0) -> UNetModel:
    """An SD1.5-shaped ldm UNetModel with random weights (fp32, eval mode)."""
    torch.manual_seed(seed)
    unet = UNetModel(model_channels=model_channels, context_dim=context_dim, **SD15_DEPTH_LAYOUT)
    randomize(unet, seed)
    return unet.eval()


def sd15_meta_unet() -> UNetModel:
    """The real SD1.5 UNet (320 channels, context 768) on the meta device: shapes only."""
    with torch.device("meta"):
        return UNetModel(model_channels=320, context_dim=768, **SD15_DEPTH_LAYOUT)


def sdxl_standin_unet(model_channels: int = 320, context_dim: int = 2048, head_channels: int = 64,
                      meta: bool = True) -> UNetModel:
    """SDXL's UNet layout (levels 1,2,4; depths [0,2,10], mid 10) built from ldm modules."""
    kwargs = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
        num_head_channels=head_channels, use_spatial_transformer=True, transformer_depth=1,
        context_dim=context_dim, use_checkpoint=False, legacy=False, use_linear_in_transformer=True,
    )
    if meta:
        with torch.device("meta"):
            unet = UNetModel(**kwargs)
    else:
        unet = UNetModel(**kwargs)
    mults = kwargs["channel_mult"]

    def deepen(st: nn.Module, depth: int) -> None:
        first = st.transformer_blocks[0]
        st.transformer_blocks = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(depth - 1)])

    for block in list(unet.input_blocks) + list(unet.output_blocks):
        for child in block.children():
            if hasattr(child, "transformer_blocks"):
                width = child.transformer_blocks[0].attn2.to_q.weight.shape[0]
                level = mults.index(width // model_channels)
                deepen(child, SDXL_DEPTHS[level])
    deepen(unet.middle_block[1], SDXL_MID_DEPTH)
    return unet


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (ldm zero-initialises proj_out and the last conv)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
