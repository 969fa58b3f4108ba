"""Attention dynamic fusion during sampling: the per-generation controller of the region hooks.

The hooks (charadapter.hooks) add each region's image cross-attention to every attn2 output,
weighted by region masks, and record the text cross-attention maps of the region phrases on
the map layers. This controller turns one step's maps into the next step's masks (soft or
hard), tells the hooks which rows of each UNet call are cond / uncond and which image they
belong to, and applies the user's start/end window.

Glossary for shapes: B rows of one UNet call, N = h*w positions, T tokens, C channels,
R regions, I images of the generation batch.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import ip_keys_values
from .errors import CharacterAdapterError
from .geometry import Size
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import AttnLayer, map_layers
from .masks import hard_masks, mask_pyramid, merge_maps, resize_masks, soft_masks, uniform_masks

COND, UNCOND = 0, 1  # token sets in RegionState.kv: reference tokens, negative tokens


@dataclass(frozen=True)
class FusionConfig:
    """What the user asked for, already validated (charadapter.params)."""

    weight: float
    region_weights: Tuple[float, ...]  # one per region; () = one global region with mask 1
    start: float = 0.0  # fraction of the sampling steps
    end: float = 1.0
    mode: str = "soft"  # "soft" | "hard"
    temperature: float = 0.1
    background: float = 0.4

    @property
    def global_only(self) -> bool:
        return len(self.region_weights) == 0


TokenGroups = Tuple[Tuple[int, ...], ...]  # per region: phrase positions in the text keys; () = absent


@dataclass(frozen=True)
class RowPlan:
    """Who is who in one step's full CFG batch, rows in the order the host stacks them."""

    is_cond: Tuple[bool, ...]
    image: Tuple[int, ...]  # image index in the generation batch
    token_groups: Tuple[Optional[TokenGroups], ...]  # per row; None for uncond rows

    def __post_init__(self):
        if not len(self.is_cond) == len(self.image) == len(self.token_groups):
            raise CharacterAdapterError(
                f"row plan lengths differ: is_cond {len(self.is_cond)}, image {len(self.image)}, "
                f"token_groups {len(self.token_groups)}"
            )

    @property
    def images(self) -> int:
        return max(self.image) + 1 if self.image else 0


class FusionSession:
    """Per-generation state plus its hooks: `install()` all or nothing, `remove()` in finally.

    The host calls `begin_pass` at each sampling start (the hires pass too) and `begin_step`
    before every denoiser call; the rows of each UNet call are matched to the step's plan in
    call order, which is how the WebUI's CFG denoiser splits its batch (cond rows first).
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[AttnLayer],
        ip_weights: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        region_tokens: torch.Tensor,
        negative_tokens: torch.Tensor,
        config: FusionConfig,
    ):
        regions = 1 if config.global_only else len(config.region_weights)
        if region_tokens.ndim != 3 or region_tokens.shape[0] != regions:
            raise CharacterAdapterError(
                f"region tokens: expected ({regions}, T, C), got {tuple(region_tokens.shape)}"
            )
        if tuple(negative_tokens.shape) != tuple(region_tokens.shape[1:]):
            raise CharacterAdapterError(
                f"negative tokens {tuple(negative_tokens.shape)} do not match region tokens "
                f"{tuple(region_tokens.shape[1:])}"
            )
        self.unet = unet
        self.layers = list(layers)
        self.config = config
        self.regions = regions
        self.levels = sorted({layer.level for layer in self.layers})
        sets = torch.stack([region_tokens, negative_tokens.expand_as(region_tokens)], dim=1)  # (R, 2, T, C_ctx)
        kv = [ip_keys_values(sets, wk.to(sets.dtype), wv.to(sets.dtype)) for wk, wv in ip_weights]
        self._weights = torch.tensor(config.region_weights or (1.0,), dtype=torch.float32) * config.weight
        self.state = RegionState(
            kv=kv,
            weights=self._weights,
            map_layers=frozenset() if config.global_only else frozenset(l.index for l in map_layers(self.layers)),
            before_call=self._before_call,
            after_call=self._after_call,
            enabled=False,
        )
        self._session: Optional[HookSession] = None
        self.latent_hw: Optional[Size] = None
        self.total_steps = 1
        self.step = 0
        self.plan: Optional[RowPlan] = None
        self._cursor = 0
        self._call_rows: List[int] = []
        self._call_groups: Optional[TokenGroups] = None
        self.masks: Optional[torch.Tensor] = None  # (I, R+1, N_latent): current layout
        self._pyramid: Optional[Dict[Size, torch.Tensor]] = None  # grid -> (I, R, N)
        self._map_sum: Optional[torch.Tensor] = None  # (I, R, N_latent)
        self._map_count: Optional[torch.Tensor] = None  # (I, 1, 1)
        self.calls_with_adapter = 0  # UNet calls that got the region term (tests, diagnostics)

    # ---- lifecycle ---------------------------------------------------------------------

    def install(self) -> "FusionSession":
        """Clear stale hooks of ours on the UNet, then register every hook or none."""
        if self._session is not None:
            raise CharacterAdapterError("fusion hooks are already installed")
        session = HookSession(root=self.unet)
        plan_region_hooks(session, self.unet, self.layers, self.state)
        session.install()
        self._session = session
        return self

    def remove(self) -> None:
        """Remove every hook and drop per-step tensors; safe to call twice."""
        session, self._session = self._session, None
        self.state.enabled = False
        self._pyramid = self._map_sum = self._map_count = None
        self.state.maps.clear()
        if session is not None:
            session.remove()

    @property
    def installed(self) -> bool:
        return self._session is not None

    def __enter__(self) -> "FusionSession":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- host events -------------------------------------------------------------------

    def begin_pass(self, latent_hw: Size, total_steps: int) -> None:
        """A sampling pass starts (first or hires): the last layout, resized, becomes the prior."""
        latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        if self.masks is not None and self.latent_hw is not None and latent_hw != self.latent_hw:
            self.masks = resize_masks(self.masks, self.latent_hw, latent_hw)
        self.latent_hw = latent_hw
        self.total_steps = max(int(total_steps), 1)
        self.step = 0
        self.plan = None
        self._pyramid = self._map_sum = self._map_count = None

    def begin_step(self, step: int, plan: RowPlan) -> None:
        """Before a denoiser call: fold the last step's maps into masks, restart the row count."""
        if self.latent_hw is None:
            raise CharacterAdapterError("begin_step before begin_pass: the latent size is unknown")
        self._fold_maps(plan.images)
        self.step = int(step)
        self.plan = plan
        self._cursor = 0

    @property
    def in_window(self) -> bool:
        """The adapter applies at this step (the user's start/end fractions)."""
        fraction = self.step / self.total_steps
        return self.config.weight > 0 and self.config.start <= fraction < self.config.end

    @property
    def collecting(self) -> bool:
        """Maps are still needed: some step at or after this one is in the window."""
        return (self.config.weight > 0 and not self.config.global_only
                and self.step / self.total_steps < self.config.end)

    # ---- masks -------------------------------------------------------------------------

    def _fold_maps(self, images: int) -> None:
        if self._map_sum is not None and self._map_count is not None:
            maps = self._map_sum / self._map_count.clamp_min(1.0)  # (I, R, N_latent)
            if self.config.mode == "hard":
                self.masks = hard_masks(maps, self.config.background)
            else:
                self.masks = soft_masks(maps, self.config.temperature, self.config.background)
        if self.masks is not None and self.masks.shape[0] != images:
            self.masks = None  # the batch changed: start from the prior again
        self._map_sum = self._map_count = None
        self._pyramid = None

    def _image_pyramid(self) -> Dict[Size, torch.Tensor]:
        """Region masks (I, R, N) per layer grid for this step (even split before any map)."""
        if self._pyramid is None:
            assert self.latent_hw is not None and self.plan is not None
            masks = self.masks
            if masks is None:
                masks = uniform_masks(self.plan.images, self.regions, self.latent_hw[0] * self.latent_hw[1])
            self._pyramid = mask_pyramid(masks, self.latent_hw, self.levels)
        return self._pyramid

    # ---- hook callbacks ----------------------------------------------------------------

    def _before_call(self, state: RegionState, x: torch.Tensor) -> None:
        """UNet entry: which plan rows this call holds, their token sets, masks and map columns."""
        state.enabled = False
        plan = self.plan
        if plan is None or self.latent_hw is None:
            return  # a UNet call outside sampling (another extension): leave it alone
        rows = int(x.shape[0])
        total = len(plan.is_cond)
        if tuple(x.shape[-2:]) != self.latent_hw or rows > total:
            return
        if self._cursor + rows > total:
            self._cursor = 0  # an extra call within one step: read the plan from the top again
        self._call_rows = list(range(self._cursor, self._cursor + rows))
        self._cursor += rows
        if not (self.in_window or self.collecting):
            return
        cond = [plan.is_cond[r] for r in self._call_rows]
        state.rows = torch.tensor([COND if c else UNCOND for c in cond], dtype=torch.long)
        # in the window: the configured weights; before it: zero weights, maps only
        state.weights = self._weights_now()
        if self.config.global_only:
            state.masks = None
        else:
            images = torch.tensor([plan.image[r] for r in self._call_rows], dtype=torch.long)
            state.masks = {hw: m.index_select(0, images) for hw, m in self._image_pyramid().items()}
        self._call_groups = self._groups_for_maps(cond)
        present = [g for g in self._call_groups or () if g]
        state.token_groups = present if self.collecting and present else None
        state.enabled = True

    def _weights_now(self) -> torch.Tensor:
        return self._weights if self.in_window else torch.zeros_like(self._weights)

    def _groups_for_maps(self, cond: List[bool]) -> Optional[TokenGroups]:
        """Token groups of the first cond row; rows with other groups give no maps this call."""
        assert self.plan is not None
        for row, is_cond in zip(self._call_rows, cond):
            if is_cond:
                return self.plan.token_groups[row]
        return None

    def _after_call(self, state: RegionState) -> None:
        """UNet exit: add the recorded maps of matching cond rows, on the latent grid, per image."""
        if not state.enabled:
            return
        self.calls_with_adapter += int(self.in_window)
        groups = self._call_groups
        if not state.maps or not groups or self.plan is None or self.latent_hw is None:
            state.maps.clear()
            return
        merged = merge_maps(state.maps.values(), self.latent_hw)  # (B, R_present, N_latent)
        state.maps.clear()
        present = [r for r, g in enumerate(groups) if g]
        full = torch.zeros(merged.shape[0], self.regions, merged.shape[2])  # absent phrase: no evidence
        full[:, present] = merged.cpu()
        if self._map_sum is None:
            self._map_sum = torch.zeros(self.plan.images, self.regions, merged.shape[2])
            self._map_count = torch.zeros(self.plan.images, 1, 1)
        for local, row in enumerate(self._call_rows):
            if self.plan.is_cond[row] and self.plan.token_groups[row] == groups:
                image = self.plan.image[row]
                self._map_sum[image] += full[local]
                self._map_count[image] += 1
