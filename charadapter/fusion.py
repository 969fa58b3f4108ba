"""Attention dynamic fusion during sampling: the per-generation controller of the region hooks.

The hooks (charadapter.hooks) add each region's image cross-attention to every attn2 output,
weighted by region masks, and record the text cross-attention maps of the region phrases on
the map layers. This controller turns one step's maps into the next step's masks (soft or
hard), tells the hooks which rows of each UNet call are cond / uncond and which image they
belong to, and applies the user's start/end window.

Several characters are (character, region) pairs over the same machinery: their tokens are
stacked into one set of P = sum_k max(R_k, 1) pairs (`owner` says whose each is), the text maps
hold every character's region phrases and then, with two or more characters, each one's subject
phrase, and masks.character_layout turns them into one layout of P pairs.

Glossary for shapes: B rows of one UNet call, N = h*w positions, T tokens, C channels,
R regions, P (character, region) pairs, K characters, I images of the generation batch.
"""

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import ip_keys_values
from .errors import CharacterAdapterError
from .geometry import Size, resize_maps
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import DEFAULT_MAP_LEVELS, AttnLayer, map_layers
from .masks import BACKGROUND, area_pyramid, character_layout, character_prior, pair_count, resize_masks

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
    subject: bool = False  # with several characters: a subject phrase's map finds this character's figure

    @property
    def global_only(self) -> bool:
        return len(self.region_weights) == 0


SHARED_SETTINGS = ("mode", "temperature", "background", "map_levels")  # one value for all characters


class CharacterTokens(NamedTuple):
    """One character of a FusionSession: its adapter's (to_k_ip, to_v_ip) per layer, its tokens, its settings."""

    ip_weights: Sequence[Tuple[torch.Tensor, torch.Tensor]]
    region_tokens: torch.Tensor  # (max(R, 1), T, C_ctx)
    negative_tokens: torch.Tensor  # (T, C_ctx)
    config: FusionConfig


def repeat_tokens(tokens: torch.Tensor, tokens_wanted: int, dim: int) -> torch.Tensor:
    """Each of T tokens repeated k = tokens_wanted / T times along `dim`: the softmax over the copies
    gives each original token its probability split k ways, so the attention output is unchanged
    (how characters with 4- and 16-token adapters share one batched term)."""
    have = tokens.shape[dim]
    if have == tokens_wanted:
        return tokens
    if tokens_wanted % have:
        raise CharacterAdapterError(
            f"image tokens: adapters with {have} and {tokens_wanted} tokens cannot share one term "
            f"({tokens_wanted} is not a multiple of {have})")
    return tokens.repeat_interleave(tokens_wanted // have, dim=dim)


# per map column (a region's or a subject's phrase): the key columns its map averages, prompt
# positions (>= 0) or phrase-bank rows (< 0, charadapter.phrases); () = not located
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

    The first (or only) character comes as (ip_weights, region_tokens, negative_tokens, config);
    further characters as `others`, whose configs must agree with `config` on SHARED_SETTINGS.
    The map columns of every row's token groups are the characters' region phrases in order,
    then (two or more characters) one subject phrase per character whose config has `subject`.

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
        others: Sequence[CharacterTokens] = (),
        phrase_bank: Optional[torch.Tensor] = None,
    ):
        characters = [CharacterTokens(ip_weights, region_tokens, negative_tokens, config)] + list(others)
        for index, character in enumerate(characters):
            _check_character(index, character, characters[0])
        self.unet = unet
        self.layers = list(layers)
        self.config = config
        self.characters = tuple(c.config for c in characters)
        self.counts = tuple(len(c.region_weights) for c in self.characters)  # R_k; 0 = the whole figure
        self.pairs = pair_count(self.counts)  # P
        self.owner = tuple(k for k, count in enumerate(self.counts) for _ in range(max(count, 1)))  # (P,)
        self.global_only = len(characters) == 1 and config.global_only
        # map columns: every character's region phrases, then each one's subject phrase (two or more characters)
        self.subject_columns: Tuple[Optional[int], ...] = (None,) * len(characters)
        if len(characters) > 1:
            subjects = [k for k, c in enumerate(self.characters) if c.subject]
            self.subject_columns = tuple(
                sum(self.counts) + subjects.index(k) if k in subjects else None for k in range(len(characters)))
        self.map_columns = sum(self.counts) + sum(c is not None for c in self.subject_columns)
        self.regions = self.pairs  # channels of the layout after the background
        self.levels = sorted({layer.level for layer in self.layers})
        tokens = max(c.region_tokens.shape[1] for c in characters)
        kv = None
        for character in characters:  # one stacked (P, 2, T, C_inner) set per layer: one batched term
            cond = repeat_tokens(character.region_tokens, tokens, dim=1)  # (R_k, T, C_ctx)
            negative = repeat_tokens(character.negative_tokens, tokens, dim=0)  # (T, C_ctx)
            sets = torch.stack([cond, negative.expand_as(cond)], dim=1)  # (R_k, 2, T, C_ctx)
            part = [ip_keys_values(sets, wk.to(sets.dtype), wv.to(sets.dtype)) for wk, wv in character.ip_weights]
            kv = part if kv is None else [(torch.cat([k0, k1]), torch.cat([v0, v1]))
                                          for (k0, v0), (k1, v1) in zip(kv, part)]
        weights = [torch.tensor(c.region_weights or (1.0,), dtype=torch.float32) * c.weight for c in self.characters]
        self._weights = weights[0] if len(weights) == 1 else torch.cat(weights)  # (P,): w_k * w_kj
        self._active: Tuple[bool, ...] = (True,) * len(characters)  # characters in their window this step
        self._step_weights: Dict[Tuple[bool, ...], torch.Tensor] = {self._active: self._weights}
        self.state = RegionState(
            kv=kv,
            weights=self._weights,
            map_layers=frozenset() if self.global_only else frozenset(l.index for l in map_layers(self.layers, config.map_levels)),
            before_call=self._before_call,
            after_call=self._after_call,
            masks_weighted=not self.global_only,
            enabled=False,
            bank=phrase_bank,  # (phrases, C_ctx): rows the plan's token groups name with entries < 0
        )
        self._session: Optional[HookSession] = None
        self.latent_hw: Optional[Size] = None
        self.total_steps = 1
        self.step = 0
        self.plan: Optional[RowPlan] = None
        self._cursor = 0
        self._call_rows: List[int] = []
        self._map_picks: List[Tuple[int, int]] = []  # (row among the call's map rows, image) to add up
        self._layout: Optional[torch.Tensor] = None  # (I, P+1, N_latent) on the UNet's device
        self._call_masks: Dict[Tuple[int, ...], Dict[Size, torch.Tensor]] = {}  # images of a call -> masks
        self._map_sums: Dict[Size, torch.Tensor] = {}  # grid -> (I, map columns, N_grid): this step's maps, summed
        self._map_counts: List[float] = []  # per image: maps summed (layers x rows x calls)
        self._device_weights: Dict[Tuple[Tuple[bool, ...], torch.device], torch.Tensor] = {}
        self._row_index: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        self.calls_with_adapter = 0  # UNet calls that got the region term (tests, diagnostics)

    @property
    def masks(self) -> Optional[torch.Tensor]:
        """The current layout (I, P+1, N_latent), background first, as a CPU copy; None before any maps."""
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
        """The phrase bank (phrases, C_ctx) whose rows token groups name with entries < 0 (charadapter.phrases)."""
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
        if not self.global_only:
            for groups in plan.token_groups:
                if groups and len(groups) != self.map_columns:  # () = a row that gives no maps
                    raise CharacterAdapterError(
                        f"row plan: {len(groups)} token groups per row, the session maps {self.map_columns} "
                        f"phrases (region phrases, then subject phrases)")
        self._fold_maps(plan.images)
        self.step = int(step)
        self.plan = plan
        self._cursor = 0
        fraction = self.step / self.total_steps
        self._active = tuple(c.weight > 0 and c.start <= fraction < c.end for c in self.characters)

    @property
    def in_window(self) -> bool:
        """Some character's term applies at this step (its start/end fractions)."""
        fraction = self.step / self.total_steps
        return any(c.weight > 0 and c.start <= fraction < c.end for c in self.characters)

    @property
    def collecting(self) -> bool:
        """Maps are still needed: some step at or after this one is in a character's window."""
        fraction = self.step / self.total_steps
        return not self.global_only and any(c.weight > 0 and fraction < c.end for c in self.characters)

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
            self._layout = self._layout_of(maps)
        if self._layout is not None and self._layout.shape[0] != images:
            self._layout = None  # the batch changed: start from the prior again
        self._forget_step()

    def _layout_of(self, maps: torch.Tensor) -> torch.Tensor:
        """Layout (I, P+1, N) of one step's maps (I, map columns, N): masks.character_layout."""
        regions = sum(self.counts)
        subjects = None
        if len(self.characters) > 1:
            columns = [c for c in self.subject_columns if c is not None]
            if len(columns) == len(self.characters):  # every character has a subject: one slice
                subjects = maps[:, columns[0]:columns[-1] + 1]  # (I, K, N)
            elif columns:  # a character without a subject has no figure map: zeros
                subjects = maps.new_zeros(maps.shape[0], len(self.characters), maps.shape[2])  # (I, K, N)
                for k, column in enumerate(self.subject_columns):
                    if column is not None:
                        subjects[:, k] = maps[:, column]
        region_maps = maps if regions == maps.shape[1] else maps[:, :regions]  # (I, sum R_k, N)
        return character_layout(subjects, region_maps if regions else None, self.counts, self.config.mode,
                                self.config.temperature, self.config.background)

    def _masks_for(self, images: Tuple[int, ...], device: torch.device) -> Dict[Size, torch.Tensor]:
        """w_k * w_kj * M_kj (B, P, N) per layer grid for the rows of one call (built once per step)."""
        found = self._call_masks.get(images)
        if found is None:
            assert self.latent_hw is not None and self.plan is not None
            layout = self._layout
            if layout is None:  # even split before any map
                layout = character_prior(self.counts, self.plan.images, self.latent_hw[0] * self.latent_hw[1],
                                         device=device)
            regions = layout.to(device)[:, BACKGROUND + 1:]  # (I, P, N_latent)
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
        state.weights = self._weights if self.global_only else self._weights_on(x.device)
        if self.global_only or not self.in_window:
            state.masks = None
        else:
            state.masks = self._masks_for(tuple(plan.image[r] for r in self._call_rows), x.device)
        state.token_groups = state.map_rows = state.row_groups = None
        self._map_picks = []
        local = [i for i, r in enumerate(self._call_rows) if plan.is_cond[r] and any(plan.token_groups[r] or ())]
        if self.collecting and local:
            # maps of the cond rows that have columns, computed over the run of rows that spans them;
            # rows of the run without columns (none in the common layouts) give zero maps, unused
            empty = ((),) * self.map_columns
            groups = tuple(plan.token_groups[self._call_rows[i]] or empty for i in range(local[0], local[-1] + 1))
            state.token_groups = groups[0]
            state.row_groups = groups if len(set(groups)) > 1 else None  # rows with other prompts
            state.map_rows = slice(local[0], local[-1] + 1)
            self._map_picks = [(i - local[0], plan.image[self._call_rows[i]]) for i in local]
        state.enabled = True

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        """w_k * w_kj (P,) of this step on the UNet's device: 0 for characters outside their window
        (a global-only session passes its CPU scalar instead)."""
        key = (self._active, device)
        found = self._device_weights.get(key)
        if found is None:
            weights = self._step_weights.get(self._active)
            if weights is None:
                active = torch.tensor([self._active[k] for k in self.owner], dtype=torch.float32)  # (P,)
                weights = self._step_weights[self._active] = self._weights * active
            found = self._device_weights[key] = weights.to(device)
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
                summed = self._map_sums[hw] = maps.new_zeros(self.plan.images, self.map_columns, maps.shape[3])
            if run and len(picks) == maps.shape[1]:
                summed[first:first + len(picks)].add_(maps.sum(dim=0))  # not "+=": that copies the slice back
            else:
                for local, image in picks:
                    summed[image].add_(maps[:, local].sum(dim=0))
            for _, image in picks:
                self._map_counts[image] += layers
        state.grid_maps.clear()
        state.maps.clear()


def _check_character(index: int, character: CharacterTokens, first_character: CharacterTokens) -> None:
    """Shapes of one character's tokens, and the settings all characters share."""
    first = first_character.config
    config, tokens, negative = character.config, character.region_tokens, character.negative_tokens
    label = f"character {index + 1}: " if index else ""
    regions = 1 if config.global_only else len(config.region_weights)
    if tokens.ndim != 3 or tokens.shape[0] != regions:
        raise CharacterAdapterError(f"{label}region tokens: expected ({regions}, T, C), got {tuple(tokens.shape)}")
    if tuple(negative.shape) != tuple(tokens.shape[1:]):
        raise CharacterAdapterError(
            f"{label}negative tokens {tuple(negative.shape)} do not match region tokens {tuple(tokens.shape[1:])}")
    width = first_character.region_tokens.shape[-1]
    if tokens.shape[-1] != width or len(character.ip_weights) != len(first_character.ip_weights):
        raise CharacterAdapterError(
            f"{label}tokens of width {tokens.shape[-1]} for {len(character.ip_weights)} layers; character 1 has "
            f"{width} for {len(first_character.ip_weights)}: one model family per generation")
    for name in SHARED_SETTINGS:
        if getattr(config, name) != getattr(first, name):
            raise CharacterAdapterError(
                f"{label}{name} {getattr(config, name)!r} differs from character 1's {getattr(first, name)!r}: "
                f"all characters share it")
