"""Attention dynamic fusion during sampling: the per-generation controller of the region hooks.

The hooks (charadapter.hooks) add each region's image cross-attention to every attn2 output,
weighted by region masks, and record the text cross-attention maps of the region phrases on
the map layers. This controller turns one step's maps into the next step's masks (soft or
hard), tells the hooks which rows of each UNet call are cond / uncond and which image they
belong to, and applies the user's start/end window.

Several characters are (character, region) pairs over the same machinery: their tokens are
stacked into one set of P = sum_k max(R_k, 1) pairs (`owner` says whose each is), the text maps
hold every character's region phrases and then, with two or more characters, each one's subject
phrase, and masks.character_logits turns them into one layout of P pairs
(masks.character_layout's numbers).

Glossary for shapes: B rows of one UNet call, N = h*w positions, T tokens, C channels,
R regions, P (character, region) pairs, K characters, I images of the generation batch.
"""

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import ip_keys_values
from .errors import CharacterAdapterError
from .geometry import Size, downsampled_hw, interpolation_matrix
from .hooks import HookSession, RegionState, plan_region_hooks, plain_math
from .layers import DEFAULT_MAP_LEVELS, AttnLayer, map_layers
from .masks import (
    BACKGROUND, MAP_FLOOR, character_logits, character_prior_last, fused_logits, one_hot_last, pair_count,
    pyramid_channels_last, resize_masks,
)

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


class _Canvas:
    """Where one step's text maps land and how they reach the latent grid, for one pass.

    `maps` (I, Hx, Wx, R+1) holds every map grid's sums as a diagonal block (grid g at rows
    y_g.., columns x_g..; zeros elsewhere) and MAP_FLOOR in the corner (Hx-1, Wx-1). Resizing is
    linear and separable, so two matrix products bring all grids to the latent grid at once and
    add them up: A_H @ maps @ A_W^T, where A's blocks are F.interpolate's bilinear weights and
    their last column of ones adds the floor exactly.
    """

    def __init__(self, grids: Sequence[Size], latent_hw: Size, images: int, channels: int, device: torch.device):
        self.latent_hw, self.images = latent_hw, images
        self.blocks: Dict[Size, Tuple[int, int]] = {}
        y = x = 0
        for hw in grids:
            self.blocks[hw] = (y, x)
            y, x = y + hw[0], x + hw[1]
        rows_h, cols_w = torch.zeros(latent_hw[0], y + 1), torch.zeros(latent_hw[1], x + 1)
        for hw, (y0, x0) in self.blocks.items():
            rows_h[:, y0:y0 + hw[0]] = interpolation_matrix(hw[0], latent_hw[0])
            cols_w[:, x0:x0 + hw[1]] = interpolation_matrix(hw[1], latent_hw[1])
        rows_h[:, y] = cols_w[:, x] = 1.0
        self.a_h, self.a_w = rows_h.to(device), cols_w.to(device)  # (H, Hx), (W, Wx)
        self.maps = torch.zeros(images, y + 1, x + 1, channels, device=device)  # (I, Hx, Wx, R+1)
        self.maps[:, y, x] = MAP_FLOOR
        self.written: Dict[Tuple[Size, int], bool] = {}  # (grid, image) -> maps written this step

    def block(self, hw: Size, first: int, count: int) -> torch.Tensor:
        """Grid hw's block of images first..first+count: (count, h, w, R+1), a view."""
        y0, x0 = self.blocks[hw]
        return self.maps[first:first + count, y0:y0 + hw[0], x0:x0 + hw[1]]

    def on_latent(self) -> torch.Tensor:
        """The step's maps on the latent grid, summed over grids: (I, N_latent, R+1), >= MAP_FLOOR."""
        images, hx, wx, channels = self.maps.shape
        cols = torch.matmul(self.a_w, self.maps.view(images * hx, wx, channels))  # (I*Hx, W, R+1)
        h, w = self.latent_hw
        return torch.matmul(self.a_h, cols.view(images, hx, w * channels)).view(images, h * w, channels)

    def clear_unwritten(self) -> bool:
        """Zero the blocks of images that got no maps this step; True if any image got maps."""
        got = {image for (_, image), done in self.written.items() if done}
        if got:
            for hw in self.blocks:
                for image in range(self.images):
                    if not self.written.get((hw, image)):
                        self.block(hw, image, 1).zero_()
        self.written = {}
        return bool(got)


class FusionSession:
    """Per-generation state plus its hooks: `install()` all or nothing, `remove()` in finally.

    The first (or only) character comes as (ip_weights, region_tokens, negative_tokens, config);
    further characters as `others`, whose configs must agree with `config` on SHARED_SETTINGS.
    The map columns of every row's token groups are the characters' region phrases in order,
    then (two or more characters) one subject phrase per character whose config has `subject`.

    The host calls `begin_pass` at each sampling start (the hires pass too) and `begin_step`
    before every denoiser call; the rows of each UNet call are matched to the step's plan in
    call order, which is how the WebUI's CFG denoiser splits its batch (cond rows first).
    The layout, the maps and the masks stay on the UNet's device: a step copies nothing from or
    to the host and never waits for the device.

    Per step, `begin_step` turns the last step's maps into mask logits for every row of the plan
    (two products bring every map grid to the latent grid, charadapter.masks.fused_logits four
    operators more); the first UNet call that adds the term makes the masks of every layer grid
    (softmax or one-hot, a cast where the UNet is not float32, one pooling per coarser level);
    each call then takes its rows' slices, views.
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
            part = [ip_keys_values(sets, wk, wv) for wk, wv in character.ip_weights]  # cast piecewise
            kv = part if kv is None else [(torch.cat([k0, k1]), torch.cat([v0, v1]))
                                          for (k0, v0), (k1, v1) in zip(kv, part)]
        weights = [torch.tensor(c.region_weights or (1.0,), dtype=torch.float32) * c.weight for c in self.characters]
        self._weights = weights[0] if len(weights) == 1 else torch.cat(weights)  # (P,): w_k * w_kj
        chosen = [] if self.global_only else map_layers(self.layers, config.map_levels)
        self._map_levels = sorted({layer.level for layer in chosen})
        self.state = RegionState(
            kv=kv,
            weights=self._weights,  # folded into the cached values once
            map_layers=frozenset(l.index for l in chosen),
            before_call=self._before_call,
            after_call=self._after_call,
            map_target=self._map_target,
            enabled=False,
            bank=phrase_bank,  # (phrases, C_ctx): rows the plan's token groups name with entries < 0
        )
        self._session: Optional[HookSession] = None
        self.latent_hw: Optional[Size] = None
        self.total_steps = 1
        self.step = 0
        self.plan: Optional[RowPlan] = None
        self._active: Tuple[bool, ...] = self._window_flags()  # characters in their window this step
        self._cursor = 0
        self._call_rows: List[int] = []
        self._map_picks: List[Tuple[int, int]] = []  # (row among the call's map rows, image) to add up
        self._canvas: Optional[_Canvas] = None
        self._logits: Optional[torch.Tensor] = None  # (B_plan or I, N, R+1) float32: the last fold
        self._logits_rows: Optional[Tuple[int, ...]] = None  # image of each logits row
        self._prior: Optional[torch.Tensor] = None  # (I, N, R+1) masks carried into a pass (hires)
        self._fixed: Optional[torch.Tensor] = None  # (I, N, R+1) float32: fix_layout's masks, else None
        self._coef: Dict[tuple, Dict[Size, torch.Tensor]] = {}  # (plan images, dtype) -> grid -> (B, N, R+1)
        self._constants: Dict[tuple, torch.Tensor] = {}
        self._device = torch.device("cpu")  # the UNet's, seen at its last call
        self.calls_with_adapter = 0  # UNet calls that got the region term (tests, diagnostics)

    @property
    def masks(self) -> Optional[torch.Tensor]:
        """The current layout (I, R+1, N_latent), background first, as a CPU copy; None before any maps."""
        layout = self._layout()
        return None if layout is None else layout.transpose(1, 2).cpu()

    def _layout(self) -> Optional[torch.Tensor]:
        """Masks per image (I, N_latent, R+1) float32 from the last fold (or the pass's prior)."""
        if self._fixed is not None:
            return self._fixed
        if self._logits is None:
            return self._prior
        rows = self._logits_rows
        first = [rows.index(image) for image in range(max(rows) + 1)]
        with plain_math(self._logits.device):
            logits = self._logits[first]  # (I, N, R+1)
            if self.config.mode == "hard":
                return one_hot_last(logits, torch.float32)
            return torch.softmax(logits, dim=-1)

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
            self._coef = {}
            self.state.grid_maps.clear()

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
        layout = self._layout()
        if layout is not None and self.latent_hw is not None and latent_hw != self.latent_hw:
            resized = resize_masks(layout.transpose(1, 2), self.latent_hw, latent_hw)  # (I, R+1, N')
            layout = resized.transpose(1, 2).contiguous()  # (I, N', R+1)
            if self._fixed is not None:
                self._fixed = layout
        self._prior, self._logits, self._logits_rows = layout, None, None
        self.latent_hw = latent_hw
        self.total_steps = max(int(total_steps), 1)
        self.step = 0
        self.plan = None
        self._active = self._window_flags()
        self._canvas = None
        self._coef = {}
        self.state.forget_bank_keys()  # projected with this pass's weights when first needed

    def begin_step(self, step: int, plan: RowPlan) -> None:
        """Before a denoiser call: fold the last step's maps into mask logits, restart the row count."""
        if self.latent_hw is None:
            raise CharacterAdapterError("begin_step before begin_pass: the latent size is unknown")
        if not self.global_only:
            for groups in plan.token_groups:
                if groups and len(groups) != self.map_columns:  # () = a row that gives no maps
                    raise CharacterAdapterError(
                        f"row plan: {len(groups)} token groups per row, the session maps {self.map_columns} "
                        f"phrases (region phrases, then subject phrases)")
        self._fold_maps(plan)
        self.step = int(step)
        self.plan = plan
        self._cursor = 0
        self._active = self._window_flags()

    def fix_layout(self, layout: Optional[torch.Tensor]) -> None:
        """Hold the layout at `layout` (I, R+1, N_latent), background first (the `masks` form),
        instead of the image's own maps, until called with None (after `begin_pass`). For
        measurements: the even-split prior frozen (no dynamics), or known masks (the ceiling)."""
        if layout is not None:
            if self.global_only:
                raise CharacterAdapterError("fix_layout: a global session (no regions) has no layout")
            if self.latent_hw is None:
                raise CharacterAdapterError("fix_layout before begin_pass: the latent size is unknown")
            positions = self.latent_hw[0] * self.latent_hw[1]
            if layout.ndim != 3 or tuple(layout.shape[1:]) != (self.regions + 1, positions):
                raise CharacterAdapterError(
                    f"fixed layout: expected (I, {self.regions + 1}, {positions}), got {tuple(layout.shape)}")
            layout = layout.float().transpose(1, 2).contiguous()  # (I, N, R+1)
        self._fixed = layout
        self._logits = self._logits_rows = None
        self._coef = {}

    def _window_flags(self) -> Tuple[bool, ...]:
        """Per character: its term applies at this step (weight > 0, within its start/end fractions)."""
        fraction = self.step / self.total_steps
        return tuple(c.weight > 0 and c.start <= fraction < c.end for c in self.characters)

    @property
    def in_window(self) -> bool:
        """Some character's term applies at this step (read per UNet call: made once per step)."""
        return any(self._active)

    @property
    def collecting(self) -> bool:
        """Maps are still needed: some step at or after this one is in a character's window (and
        the layout is not held by fix_layout)."""
        fraction = self.step / self.total_steps
        return (self._fixed is None and not self.global_only
                and any(c.weight > 0 and fraction < c.end for c in self.characters))

    # ---- masks -------------------------------------------------------------------------

    def _fold_maps(self, plan: RowPlan) -> None:
        """The last step's maps -> mask logits for the rows of `plan` (or per image)."""
        canvas = self._canvas
        images = plan.images
        if self._fixed is not None:
            if self._fixed.shape[0] != images:
                raise CharacterAdapterError(f"fixed layout holds {self._fixed.shape[0]} images, the step has {images}")
            return
        if canvas is not None and canvas.clear_unwritten() and canvas.images == images:
            copies = _copies(plan)
            bias = self._constant("bias", canvas.maps.device)
            with plain_math(canvas.maps.device):  # float32 throughout
                maps = canvas.on_latent()  # (I, N, R+1)
                logits = fused_logits(maps, bias, self.config.temperature, copies or 1)  # (S, I, N, 1+columns)
                if len(self.characters) > 1:  # the two levels: figure shares, then each figure's regions
                    subjects = [None if c is None else c + 1 for c in self.subject_columns]  # after the background
                    logits = character_logits(logits, self.counts, subjects, self.config.mode,
                                              self.config.temperature)  # (S, I, N, P+1)
            self._logits = logits.view(-1, *logits.shape[2:])  # (S*I, N, P+1)
            self._logits_rows = tuple(plan.image) if copies else tuple(range(images))
            self._prior = None
            self._coef = {}
        layout_images = (max(self._logits_rows) + 1 if self._logits is not None
                         else (self._prior.shape[0] if self._prior is not None else images))
        if layout_images != images:  # the batch changed: start from the prior again
            self._logits = self._logits_rows = self._prior = None
            self._coef = {}

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """Small per-generation tensors on the UNet's device (built once, never per step)."""
        key = (name, device)
        found = self._constants.get(key)
        if found is None:
            if name == "bias":  # background logit / temperature, then every map column's 0
                value = torch.zeros(self.map_columns + 1)
                value[BACKGROUND] = self.config.background / self.config.temperature
            elif name == "channels":
                value = torch.arange(self.regions + 1)
            else:
                raise KeyError(name)
            found = self._constants[key] = value.to(device)
        return found

    def _masks_for_plan(self, device: torch.device, dtype: torch.dtype) -> Dict[Size, torch.Tensor]:
        """Masks (B_plan, N, R+1) per layer grid for every row of the step's plan, in `dtype`
        (built at the step's first call that adds the term, then only sliced)."""
        assert self.plan is not None and self.latent_hw is not None
        key = (self.plan.image, device, dtype, self._active)
        found = self._coef.get(key)
        if found is None:
            with plain_math(device):
                found = self._coef[key] = self._make_masks(device, dtype)
        return found

    def _make_masks(self, device: torch.device, dtype: torch.dtype) -> Dict[Size, torch.Tensor]:
        assert self.plan is not None and self.latent_hw is not None
        rows = len(self.plan.image)
        positions = self.latent_hw[0] * self.latent_hw[1]
        shape = (rows, positions, self.regions + 1)
        if self._logits is not None and self._logits_rows == self.plan.image:
            source = self._logits  # logits of exactly these rows
        elif self._logits is not None:
            source = self._logits[[self._logits_rows.index(i) for i in self.plan.image]]  # (B, N, R+1)
        else:
            source = None
        if self._fixed is not None:  # fix_layout's masks, as given (no softmax, no one-hot)
            masks = self._fixed.to(device)[list(self.plan.image)].to(dtype)  # (B, N, R+1)
        elif source is not None and self.config.mode == "hard":
            masks = one_hot_last(source, dtype, self._constant("channels", device))
        elif source is not None:
            masks = torch.softmax(source, dim=-1)
            masks = masks if masks.dtype == dtype else masks.to(dtype)
        elif self._prior is not None:
            masks = torch.empty(shape, dtype=dtype, device=device)
            masks.copy_(self._prior.to(device)[list(self.plan.image)])
        else:  # even split before any map: 1/R for every region, built once per shape
            masks = self._uniform(shape, device, dtype)
        if not all(self._active):  # a character outside its window this step: its pairs add nothing
            masks = masks * self._active_channels(device, dtype)
        return pyramid_channels_last(masks, self.latent_hw, self.levels)

    def _active_channels(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(P+1,) 1 for the background and the pairs of characters in their window, else 0."""
        key = ("active", self._active, device, dtype)
        found = self._constants.get(key)
        if found is None:
            values = [1.0] + [float(self._active[k]) for k in self.owner]
            found = self._constants[key] = torch.tensor(values, dtype=dtype, device=device)
        return found

    def _uniform(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = ("uniform", shape, device, dtype)
        found = self._constants.get(key)
        if found is None:
            # each character 1/K, shared evenly among its pairs (one character: 1/R each); background 0
            found = self._constants[key] = character_prior_last(self.counts, shape, device, dtype)
        return found

    def _map_target(self, hw: Size, rows: int) -> Optional[torch.Tensor]:
        """The canvas block the hooks sum this call's maps of grid hw into, when the call's map rows
        are a run of images that got no maps of this grid yet this step; else None (added after)."""
        picks = self._map_picks
        if len(picks) != rows or self.plan is None:
            return None
        first = picks[0][1]
        if any(image != first + i for i, (_, image) in enumerate(picks)):
            return None
        canvas = self._canvas_for(self._device)
        if any(canvas.written.get((hw, image)) for _, image in picks):
            return None
        for _, image in picks:
            canvas.written[(hw, image)] = True
        return canvas.block(hw, first, rows)

    def _canvas_for(self, device: torch.device) -> _Canvas:
        canvas = self._canvas
        assert self.plan is not None and self.latent_hw is not None
        if canvas is None or canvas.images != self.plan.images or canvas.maps.device != device:
            grids = [downsampled_hw(self.latent_hw, level) for level in self._map_levels]
            canvas = self._canvas = _Canvas(grids, self.latent_hw, self.plan.images, self.map_columns + 1, device)
        return canvas

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
        start = self._cursor
        self._call_rows = list(range(start, start + rows))
        self._cursor += rows
        if not (self.in_window or self.collecting):
            return
        self._device = x.device
        state.planned = start == 0 and rows == total  # the step's whole batch, in its planned order
        cond = [plan.is_cond[r] for r in self._call_rows]
        state.rows = tuple(COND if c else UNCOND for c in cond)
        # in the window: the term; before it: maps only
        state.add_term = self.in_window
        state.coef = None
        if state.add_term and not self.global_only:
            state.coef = _CallMasks(self, start, rows)
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

    def _after_call(self, state: RegionState) -> None:
        """UNet exit: maps the hooks could not sum straight into the canvas are added to it here."""
        if not state.enabled:
            return
        self.calls_with_adapter += int(self.in_window)
        if not state.grid_maps or not state.token_groups or self.plan is None:
            state.grid_maps.clear()
            return
        canvas = self._canvas_for(self._device)
        picks = self._map_picks
        for hw, maps in state.grid_maps.items():  # maps (B_map, h, w, R+1)
            for local, image in picks:
                block = canvas.block(hw, image, 1)  # (1, h, w, R+1)
                if canvas.written.get((hw, image)):
                    block.add_(maps[local:local + 1])
                else:
                    block.copy_(maps[local:local + 1])
                    canvas.written[(hw, image)] = True
        state.grid_maps.clear()


class _CallMasks:
    """The masks of one UNet call's rows, made on first use (the layer's dtype is known there)."""

    __slots__ = ("session", "start", "rows", "_found")

    def __init__(self, session: FusionSession, start: int, rows: int):
        self.session, self.start, self.rows = session, start, rows
        self._found: Optional[Dict[Size, torch.Tensor]] = None

    def __call__(self, hw: Size, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Masks (B_call, N, R) of grid hw: slices of the step's masks, no copy."""
        found = self._found
        if found is None:
            plan = self.session._masks_for_plan(device, dtype)
            end = self.start + self.rows
            found = self._found = {g: m[self.start:end, :, BACKGROUND + 1:] for g, m in plan.items()}
        return found.get(tuple(hw))


def _copies(plan: RowPlan) -> int:
    """S when the plan's rows are S copies of images 0..I-1 in order (CFG: cond rows, then uncond
    rows), so row logits are a broadcast of image maps; else 0."""
    images = plan.images
    rows = len(plan.image)
    if images and rows % images == 0 and tuple(plan.image) == tuple(range(images)) * (rows // images):
        return rows // images
    return 0


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
