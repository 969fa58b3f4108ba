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
from .geometry import Size, resize_maps
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import DEFAULT_MAP_LEVELS, AttnLayer, map_layers
from .masks import BACKGROUND, area_pyramid, hard_masks, resize_masks, soft_masks, uniform_masks

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
    map_levels: Tuple[int, ...] = DEFAULT_MAP_LEVELS  # UNet levels whose text maps give the soft labels

    @property
    def global_only(self) -> bool:
        return len(self.region_weights) == 0


# per region: the key columns its map averages, prompt positions (>= 0) or phrase-bank rows
# (< 0, charadapter.phrases); () = not located
TokenGroups = Tuple[Tuple[int, ...], ...]


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
    The layout, the maps and the mask pyramid stay on the UNet's device: a step copies nothing
    from or to the host and never waits for the device.
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[AttnLayer],
        ip_weights: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        region_tokens: torch.Tensor,
        negative_tokens: torch.Tensor,
        config: FusionConfig,
        phrase_bank: Optional[torch.Tensor] = None,
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
            map_layers=frozenset() if config.global_only else frozenset(l.index for l in map_layers(self.layers, config.map_levels)),
            before_call=self._before_call,
            after_call=self._after_call,
            masks_weighted=not config.global_only,
            enabled=False,
            bank=phrase_bank,  # (P, C_ctx): rows the plan's token groups name with entries < 0
        )
        self._session: Optional[HookSession] = None
        self.latent_hw: Optional[Size] = None
        self.total_steps = 1
        self.step = 0
        self.plan: Optional[RowPlan] = None
        self._cursor = 0
        self._call_rows: List[int] = []
        self._map_picks: List[Tuple[int, int]] = []  # (row among the call's map rows, image) to add up
        self._layout: Optional[torch.Tensor] = None  # (I, R+1, N_latent) on the UNet's device
        self._call_masks: Dict[Tuple[int, ...], Dict[Size, torch.Tensor]] = {}  # images of a call -> masks
        self._map_sums: Dict[Size, torch.Tensor] = {}  # grid -> (I, R, N_grid): this step's maps, summed
        self._map_counts: List[float] = []  # per image: maps summed (layers x rows x calls)
        self._device_weights: Dict[torch.device, torch.Tensor] = {}
        self._row_index: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        self.calls_with_adapter = 0  # UNet calls that got the region term (tests, diagnostics)

    @property
    def masks(self) -> Optional[torch.Tensor]:
        """The current layout (I, R+1, N_latent), background first, as a CPU copy; None before any maps."""
        return None if self._layout is None else self._layout.cpu()

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
        try:
            self.detach_hooks()
        finally:
            self._forget_step()
            self.state.maps.clear()

    def detach_hooks(self) -> None:
        """Remove the hooks but keep the layout and the maps gathered so far; `install()` goes on.

        For callers that switch several sessions on one UNet (the benchmark); a generation ends
        with `remove()`.
        """
        session, self._session = self._session, None
        self.state.enabled = False
        if session is not None:
            session.remove()

    def set_phrase_bank(self, embeddings: Optional[torch.Tensor]) -> None:
        """The phrase bank (P, C_ctx) whose rows token groups name with entries < 0 (charadapter.phrases)."""
        self.state.bank = embeddings
        self.state.forget_bank_keys()

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
        if self._layout is not None and self.latent_hw is not None and latent_hw != self.latent_hw:
            self._layout = resize_masks(self._layout, self.latent_hw, latent_hw)
        self.latent_hw = latent_hw
        self.total_steps = max(int(total_steps), 1)
        self.step = 0
        self.plan = None
        self._forget_step()
        self.state.forget_bank_keys()  # projected with this pass's weights when first needed

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

    def _forget_step(self) -> None:
        self._call_masks = {}
        self._map_sums = {}
        self._map_counts = []

    def _fold_maps(self, images: int) -> None:
        if self._map_sums and self.latent_hw is not None:
            maps = None
            for hw, summed in self._map_sums.items():  # resizing is linear: sum first, resize once per grid
                resized = resize_maps(summed, hw, self.latent_hw)  # (I, R, N_latent)
                maps = resized if maps is None else maps + resized
            counts = [max(c, 1.0) for c in self._map_counts]
            if len(set(counts)) == 1:
                maps = maps / counts[0]
            else:
                for image, count in enumerate(counts):
                    maps[image] /= count
            if self.config.mode == "hard":
                self._layout = hard_masks(maps, self.config.background)
            else:
                self._layout = soft_masks(maps, self.config.temperature, self.config.background)
        if self._layout is not None and self._layout.shape[0] != images:
            self._layout = None  # the batch changed: start from the prior again
        self._forget_step()

    def _masks_for(self, images: Tuple[int, ...], device: torch.device) -> Dict[Size, torch.Tensor]:
        """w * w_r * M_r (B, R, N) per layer grid for the rows of one call (built once per step)."""
        found = self._call_masks.get(images)
        if found is None:
            assert self.latent_hw is not None and self.plan is not None
            layout = self._layout
            if layout is None:  # even split before any map
                layout = uniform_masks(self.plan.images, self.regions, self.latent_hw[0] * self.latent_hw[1],
                                       device=device)
            regions = layout.to(device)[:, BACKGROUND + 1:]  # (I, R, N_latent)
            if self.plan.images == 1:  # every row shows the one image
                regions = regions.expand(len(images), -1, -1)  # (B, R, N_latent), a view
            elif images != tuple(range(self.plan.images)):
                index = self._row_index.get((images, device))
                if index is None:  # copied to the device once per generation, not per step
                    index = self._row_index[(images, device)] = torch.tensor(images, dtype=torch.long).to(device)
                regions = regions.index_select(0, index)  # (B, R, N_latent)
            weighted = regions * self._weights_on(device).view(1, -1, 1)  # area averages are linear: weigh first
            found = self._call_masks[images] = area_pyramid(weighted, self.latent_hw, self.levels)
        return found

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
        # in the window: the configured weights; before it: maps only (the weights go unread)
        state.add_term = self.in_window
        state.weights = self._weights if self.config.global_only else self._weights_on(x.device)
        if self.config.global_only or not self.in_window:
            state.masks = None
        else:
            state.masks = self._masks_for(tuple(plan.image[r] for r in self._call_rows), x.device)
        state.token_groups = state.map_rows = state.row_groups = None
        self._map_picks = []
        local = [i for i, r in enumerate(self._call_rows) if plan.is_cond[r] and any(plan.token_groups[r] or ())]
        if self.collecting and local:
            # maps of the cond rows that have columns, computed over the run of rows that spans them;
            # rows of the run without columns (none in the common layouts) give zero maps, unused
            empty = ((),) * self.regions
            groups = tuple(plan.token_groups[self._call_rows[i]] or empty for i in range(local[0], local[-1] + 1))
            state.token_groups = groups[0]
            state.row_groups = groups if len(set(groups)) > 1 else None  # rows with other prompts
            state.map_rows = slice(local[0], local[-1] + 1)
            self._map_picks = [(i - local[0], plan.image[self._call_rows[i]]) for i in local]
        state.enabled = True

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        """w * w_r on the UNet's device (a global-only session passes its CPU scalar instead)."""
        found = self._device_weights.get(device)
        if found is None:
            found = self._device_weights[device] = self._weights.to(device)
        return found

    def _after_call(self, state: RegionState) -> None:
        """UNet exit: add the recorded maps of this call's map rows to their images' sums, per grid."""
        if not state.enabled:
            return
        self.calls_with_adapter += int(self.in_window)
        if not state.grid_maps or not state.token_groups or self.plan is None:
            state.maps.clear()
            state.grid_maps.clear()
            return
        picks = self._map_picks
        if len(self._map_counts) != self.plan.images:
            self._map_counts = [0.0] * self.plan.images
        first = picks[0][1]
        run = picks == [(i, first + i) for i in range(len(picks))]  # CFG: cond rows are images 0..I-1 in order
        for hw, maps in state.grid_maps.items():  # maps (L, B_map, R, N_grid): L map layers on this grid
            layers = maps.shape[0]
            summed = self._map_sums.get(hw)
            if summed is None:
                summed = self._map_sums[hw] = maps.new_zeros(self.plan.images, self.regions, maps.shape[3])
            if run and len(picks) == maps.shape[1]:
                summed[first:first + len(picks)].add_(maps.sum(dim=0))  # not "+=": that copies the slice back
            else:
                for local, image in picks:
                    summed[image].add_(maps[:, local].sum(dim=0))
            for _, image in picks:
                self._map_counts[image] += layers
        state.grid_maps.clear()
        state.maps.clear()
