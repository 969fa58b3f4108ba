"""Forward hooks that add the region IP term to the host's attn2 output, installed all or nothing
and always removed.

Nothing here assigns ``forward``: the WebUI swaps CrossAttention.forward at class level for its
attention optimisation, and other extensions patch instances; module hooks fire around whatever
forward is in place. Per-generation data lives in a `RegionState` handed to the hooks, never on
modules.

Capture protocol per attn2 layer (a `_Slot` per layer, valid for one attn2 call only):
  attn2 pre-hook     clears the slot and arms it (so nothing from an earlier call survives);
  to_q hook          stores the host's q (B, N, C_inner) while armed; to_k the same for text maps;
  to_out[0] pre-hook adds the region term to the attention output, in place, before the host's own
                     output projection (W_out (a + delta) + b: exact, and no second C x C matmul);
  attn2 hook         disarms and clears the slot; if to_out[0] was not called once with the whole
                     output, it adds W_out delta to the attn2 output instead.
If the host did not call to_q exactly once with the attn2 input, q is recomputed with the
module's own to_q, so a missing or doubled capture can never pair a wrong q with this call.
What a layer needs is built on the device once and cached (keys and values in head layout with
the weights folded in, per generation; the map values, per token groups) or handed over ready
(mask coefficients per grid, once per step by charadapter.fusion), so a call builds nothing, moves
nothing between host and device and never waits for the device. The text maps of a call are
queued and computed together when its last map layer ran: one copy, then one attention and one
sum per grid, whatever the number of layers and regions. A region located from its own phrase
(charadapter.phrases) adds key rows to the maps only: its phrase-bank rows, projected by each map
layer's own to_k once per pass, go into that same copy after each row's prompt keys.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    RegionKV, add_region_term, attention_dtype, map_dtype, mask_coefficients, region_kv, text_attention_raw,
    text_map_values,
)
from .errors import CharacterAdapterError, GeometryError
from .geometry import Size, check_grid, downsampled_hw
from .layers import AttnLayer
from .phrases import bank_rows, resolve_columns

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
# torch keeps per-hook flags in side dicts keyed by the same handle id (2.0: with_kwargs, 2.1+: always_call)
_SIDE_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class MarkedHook:
    """A hook callable that carries the marker `_charadapter`, so leftovers can be found."""

    _charadapter = True

    def __init__(self, fn: Callable, label: str = ""):
        self.fn = fn
        self.label = label

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"MarkedHook({self.label or self.fn!r})"


def _is_ours(fn: Any) -> bool:
    """True for hooks that this package registered."""
    try:
        return getattr(fn, "_charadapter", False) is True
    except Exception:  # a foreign object with a raising __getattr__ is not ours
        return False


def clear_stale(root: nn.Module) -> int:
    """Remove hooks a previous (crashed) session left on `root` and its submodules; return how many."""
    removed = 0
    for module in root.modules():
        for dict_name in _HOOK_DICTS:
            hooks = getattr(module, dict_name, None)
            if not hooks:
                continue
            for key in [k for k, fn in hooks.items() if _is_ours(fn)]:
                del hooks[key]
                for side in _SIDE_DICTS:
                    getattr(module, side, {}).pop(key, None)
                removed += 1
    return removed


class HookSession:
    """Context manager: registers the planned hooks all or nothing, removes every handle on exit.

    Plan with `add_forward_hook` / `add_forward_pre_hook`, then ``with session:``. With `root`
    given, entering first clears stale hooks of ours under it.
    """

    def __init__(self, root: Optional[nn.Module] = None):
        self.root = root
        self._plan: List[Tuple[nn.Module, str, MarkedHook, bool]] = []
        self._handles: List[Any] = []
        self._entered = False
        self.stale_removed = 0

    def add_forward_hook(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False, label: str = ""):
        """Plan a forward hook (called as hook(module, args[, kwargs], output))."""
        self._plan_hook(module, "forward", hook, with_kwargs, label)

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False, label: str = ""):
        """Plan a forward pre-hook (called as hook(module, args[, kwargs]))."""
        self._plan_hook(module, "pre", hook, with_kwargs, label)

    def _plan_hook(self, module, kind, hook, with_kwargs, label):
        if self._entered:
            raise RuntimeError("HookSession is active: plan every hook before entering it")
        self._plan.append((module, kind, MarkedHook(hook, label), with_kwargs))

    @property
    def active(self) -> bool:
        """True between a successful __enter__ and close."""
        return self._entered

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookSession":
        if self._entered:
            raise RuntimeError("HookSession entered twice")
        self._entered = True
        if self.root is not None:
            self.stale_removed = clear_stale(self.root)
        try:
            for module, kind, hook, with_kwargs in self._plan:
                if kind == "forward":
                    handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
                else:
                    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
                self._handles.append(handle)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def install(self) -> "HookSession":
        """Register the planned hooks, all or nothing (same as entering); pair with `remove` in finally."""
        return self.__enter__()

    def remove(self) -> None:
        """Remove every registered handle (same as `close`)."""
        self.close()

    def close(self) -> None:
        """Remove every registered handle (idempotent)."""
        handles, self._handles = self._handles, []
        self._entered = False
        error = None
        for handle in reversed(handles):
            try:
                handle.remove()
            except Exception as exc:  # keep removing the rest, report the first failure
                error = error or exc
        if error is not None:
            raise error


@dataclass
class RegionState:
    """Everything the region hooks need for one generation; the host updates the per-call fields.

    kv[i] belongs to layer i: keys and values (R, S, T, C_inner) for S token sets (e.g. 0 = the
    reference tokens for cond rows, 1 = the negative tokens for uncond rows). `rows` (ints, one per
    row of the current UNet call) picks each row's token set. `kv` and `weights` are fixed for the
    life of the state (the weights are folded into the cached values): make a new state when they
    change. The masks come either from `coef(grid, device, dtype)`, ready for the call's rows
    ((B, N, R) in the region term's `attention_dtype`: the fast path, built once per step by
    charadapter.fusion), or as `masks` ((B|1, R, N) per grid, see masks.mask_pyramid), converted
    per call; neither: M = 1.
    Text maps of the rows `map_rows` are summed per grid over the map layers: into the views
    `map_target(grid, rows)` returns, or else into `grid_maps`. Each map row averages the key
    columns `token_groups` names, or its own entry of `row_groups` when the rows differ.
    `bank` holds the token embeddings of phrases located from themselves (charadapter.phrases):
    token-group entries < 0 name its rows, which the map layers project with their own to_k and
    append to the prompt's keys, for the maps only (projections kept until `forget_bank_keys`).
    """

    kv: Sequence[Tuple[torch.Tensor, torch.Tensor]]
    weights: torch.Tensor                                    # (R,) or (B, R): w * w_r
    rows: Optional[Sequence[int]] = None                     # (B,) token set per row; None: S == 1 or S == B
    masks: Optional[Dict[Size, torch.Tensor]] = None
    coef: Optional[Callable[[Size, torch.device, torch.dtype], Optional[torch.Tensor]]] = None  # -> (B, N, R)
    map_layers: FrozenSet[int] = frozenset()                 # layer indices whose text maps are recorded
    token_groups: Optional[Sequence[Sequence[int]]] = None   # text key columns of each region phrase
    row_groups: Optional[Tuple[Sequence[Sequence[int]], ...]] = None  # per map row, when the rows differ
    before_call: Optional[Callable[["RegionState", torch.Tensor], None]] = None  # (state, x) at UNet entry
    after_call: Optional[Callable[["RegionState"], None]] = None                 # at UNet exit
    enabled: bool = True
    add_term: bool = True                                    # False: record maps only (weights unread)
    map_rows: Optional[slice] = None                         # rows of the call whose maps are recorded
    map_target: Optional[Callable[[Size, int], Optional[torch.Tensor]]] = None  # (grid, B_map) -> (B_map, h, w, R+1)
    planned: bool = False                                    # the call holds the step's whole row plan
    bank: Optional[torch.Tensor] = None                      # (P, C_ctx) phrase-bank rows, named by entries < 0
    # written by the hooks, per UNet call
    latent_hw: Optional[Size] = None
    batch: Optional[int] = None
    grid_maps: Dict[Size, torch.Tensor] = field(default_factory=dict)  # grid -> (B_map, h, w, R+1) float32
    grid_layers: Dict[Size, int] = field(default_factory=dict)  # grid -> map layers summed this call
    map_total: int = field(default=0, repr=False)            # map layers per UNet call (planned)
    queue_level: Tuple[int, int] = field(default=(0, 320), repr=False)  # finest attention level, its C (planned)
    _queue: List[tuple] = field(default_factory=list, repr=False)  # (grid, heads, q, key pieces, T) not computed yet
    _queued: int = field(default=0, repr=False)
    _queue_cap: int = field(default=0, repr=False)
    _seen: int = field(default=0, repr=False)
    _targets: Dict[Size, torch.Tensor] = field(default_factory=dict, repr=False)  # grids written via map_target
    _kv: Dict[tuple, RegionKV] = field(default_factory=dict, repr=False)
    _coef: Dict[Size, Optional[torch.Tensor]] = field(default_factory=dict, repr=False)  # per call, from masks
    _values: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _groups_seen: Optional[tuple] = field(default=None, repr=False)  # (token_groups, row_groups, as ints)
    _bank_rows: Dict[tuple, Tuple[int, ...]] = field(default_factory=dict, repr=False)  # groups -> bank rows
    _bank_keys: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # per layer: (P*C,)

    def start_call(self, latent_hw: Size, batch: int) -> None:
        """UNet entry: forget the last call's maps and coefficients."""
        self.latent_hw = latent_hw
        self.batch = batch
        # maps wait for the call's last map layer (SD1.5: all of them fit), or until the q's they
        # hold reach 4 attention inputs of the finest attention level: bounded memory (SDXL)
        level, width = self.queue_level
        h, w = downsampled_hw(latent_hw, level)
        self._queue_cap = 4 * batch * h * w * width  # elements
        self.clear_call()

    def clear_call(self) -> None:
        """Drop what the last UNet call left: its maps (on the device), queue and coefficients."""
        self.grid_maps.clear()
        self.grid_layers.clear()
        self._targets.clear()
        self._queue.clear()
        self._queued = self._seen = 0
        self._coef.clear()

    def add_map(self, hw: Size, heads: int, q: torch.Tensor, k: torch.Tensor,
                rows: slice = slice(None), bank_keys: Optional[torch.Tensor] = None) -> None:
        """Queue the map rows `rows` of a map layer's q (B, N, C) and k (B, T, C), with its
        projected bank rows (P*C,) or None; compute the queue when the call's last map layer ran,
        or when it grew past its cap."""
        self._queue.append((hw, heads, q[rows], self.map_keys(k, rows, bank_keys), k.shape[1]))
        self._queued += q.untyped_storage().nbytes() // q.element_size()  # all of q is held, not only its map rows
        self._seen += 1
        if self._seen >= self.map_total or self._queued > self._queue_cap:
            self.flush_maps()

    def map_keys(self, k: torch.Tensor, rows: slice = slice(None),
                 bank_keys: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The text keys of a map layer's map rows as pieces whose concatenation, flattened,
        is (B_map, T', C): the host's k (T' = T), or with bank rows (P*C,) each row's T prompt keys
        then the P phrase keys (T' = T + P). Views only, as many as without a bank: the queue's one
        copy lays them out, so the phrase's keys cost no operator of their own. The groups index
        them from T on."""
        if bank_keys is None:
            return [k[rows]]  # (B_map, T, C)
        flat = k.reshape(k.shape[0], -1).unbind(0)[rows]  # B_map rows (T*C,)
        return [piece for row in flat for piece in (row, bank_keys)]

    def bank_keys(self, layer: AttnLayer, to_k: nn.Module, device: torch.device, dtype: torch.dtype
                  ) -> Optional[torch.Tensor]:
        """The bank rows the current token groups name, projected with this layer's own to_k
        (P*C_inner,) (flat, as the map queue copies it) in the keys' dtype; None when the groups
        name prompt tokens only. Computed at the layer (where a low-VRAM host has put its weights)
        once per pass."""
        rows = self.groups_bank_rows()
        if not rows:
            return None
        key = (layer.index, rows, device, dtype)
        found = self._bank_keys.get(key)
        if found is None:
            if self.bank is None:
                raise CharacterAdapterError(f"token groups name phrase-bank rows {rows} but no phrase bank is set")
            pick = torch.tensor(rows, dtype=torch.long)
            phrases = self.bank.index_select(0, pick).to(device=device, dtype=dtype)  # (P, C_ctx)
            # the module itself, as the host calls it (LoRA, fp8 casts); its q/k are already captured
            found = self._bank_keys[key] = to_k(phrases).to(dtype).reshape(-1)  # (P*C_inner,)
        return found

    def groups_bank_rows(self) -> Tuple[int, ...]:
        """The bank rows the current token groups name, over every map row (cached per groups)."""
        if not self.token_groups:
            return ()
        key = self._groups_key()
        found = self._bank_rows.get(key)
        if found is None:
            found = self._bank_rows[key] = bank_rows([g for row in key for g in row])
        return found

    def _groups_key(self) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
        """The map rows' groups as ints: one entry when the rows share them (made once per call)."""
        seen = self._groups_seen
        if seen is None or seen[0] is not self.token_groups or seen[1] is not self.row_groups:
            rows = self.row_groups or (self.token_groups or (),)
            key = tuple(tuple(tuple(int(t) for t in g) for g in groups) for groups in rows)
            seen = self._groups_seen = (self.token_groups, self.row_groups, key)
        return seen[2]

    def forget_bank_keys(self) -> None:
        """Drop the projected bank rows (a new pass may bring other weights: LoRA, another UNet)."""
        self._bank_keys.clear()

    def flush_maps(self) -> None:
        """Compute the queued maps: one copy of every queued q and k, one attention and one sum per grid."""
        queue, self._queue, self._queued = self._queue, [], 0
        if not queue or not self.token_groups:
            return
        groups: Dict[tuple, list] = {}
        for hw, heads, q, keys, prompt_tokens in queue:
            tokens = sum(p.numel() for p in keys) // (q.shape[0] * q.shape[2])
            groups.setdefault((hw, heads, tuple(q.shape), tokens, prompt_tokens, q.dtype, q.device), []
                              ).append((q, keys))
        pieces = [t if t.ndim == 1 else t.reshape(-1) for items in groups.values() for t in
                  [q for q, _ in items] + [p for _, keys in items for p in keys]]
        del queue
        first = pieces[0]
        dtype = map_dtype(first.dtype)  # float16 attends in float32 (scores past 65504): the copy casts
        if dtype == first.dtype:
            flat = first if len(pieces) == 1 else torch.cat(pieces)  # every q and k, one copy
        else:
            flat = torch.empty(sum(p.numel() for p in pieces), dtype=dtype, device=first.device)
            torch.cat(pieces, out=flat)
        del pieces
        regions = len(self.token_groups)
        offset = 0
        for (hw, heads, q_shape, tokens, prompt_tokens, _, device), items in groups.items():
            layers = len(items)
            rows, positions, width = q_shape
            size_q, size_k = layers * rows * positions * width, layers * rows * tokens * width
            q = flat[offset:offset + size_q].view(layers * rows, positions, width)  # (L*B_map, N, C)
            k = flat[offset + size_q:offset + size_q + size_k].view(layers * rows, tokens, width)  # (L*B_map, T, C)
            offset += size_q + size_k
            values = self.map_values(tokens, heads, width // heads, device, flat.dtype, prompt_tokens,
                                     layers * rows)  # (H, T, Ev), or per row (L*B_map, H, T, Ev)
            with plain_math(device):
                raw = text_attention_raw(q, k, values)  # (L*B_map, N, H, Ev)
            raw = raw.reshape(layers, rows, hw[0], hw[1], heads, -1)[..., :regions + 1]  # (L, B_map, h, w, H, R+1)
            self._sum_into(hw, rows, raw)
            self.grid_layers[hw] = self.grid_layers.get(hw, 0) + layers

    def _sum_into(self, hw: Size, rows: int, raw: torch.Tensor) -> None:
        """Sum raw maps (L, B_map, h, w, H, R+1) over layers and heads into this call's grid maps."""
        target = self._targets.get(hw)
        if target is None and hw not in self.grid_maps and self.map_target is not None:
            target = self.map_target(hw, rows)
            if target is not None:
                torch.sum(raw, dim=(0, 4), dtype=torch.float32, out=target)  # (B_map, h, w, R+1)
                self._targets[hw] = target
                return
        summed = raw.sum(dim=(0, 4), dtype=torch.float32)  # (B_map, h, w, R+1)
        if target is not None:
            target.add_(summed)
        elif hw in self.grid_maps:
            self.grid_maps[hw].add_(summed)
        else:
            self.grid_maps[hw] = summed

    def map_values(self, tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype,
                   prompt_tokens: Optional[int] = None, rows: int = 1) -> torch.Tensor:
        """Map values of the current token groups over T key columns, the first `prompt_tokens`
        (default all) the prompt's, the rest the named bank rows (cached): (H, T, Ev) when the map
        rows share their groups, else (rows, H, T, Ev) for `rows` = L*B_map rows, layer by layer."""
        key_groups = self._groups_key()
        prompt_tokens = tokens if prompt_tokens is None else prompt_tokens
        per_row = len(key_groups) > 1
        key = (key_groups, tokens, prompt_tokens, heads, dim, device, dtype, rows if per_row else 1)
        found = self._values.get(key)
        if found is None:
            bank = self.groups_bank_rows()
            if len(bank) != tokens - prompt_tokens:
                raise GeometryError(f"{tokens - prompt_tokens} key columns after the prompt, but the token "
                                    f"groups name {len(bank)} phrase-bank rows")
            values = [text_map_values(resolve_columns(groups, prompt_tokens, bank), tokens, heads, dim, device, dtype,
                                      allow_empty=True) for groups in key_groups]  # each (H, T, Ev)
            if per_row:
                if rows % len(values):
                    raise GeometryError(f"{len(values)} rows of token groups for {rows} map rows")
                found = torch.stack(values * (rows // len(values)))  # (L*B_map, H, T, Ev)
            else:
                found = values[0]
            self._values[key] = found
        return found

    def _rows_for(self, batch: int) -> Optional[Tuple[int, ...]]:
        rows = self.rows
        if rows is None:
            return None
        if isinstance(rows, torch.Tensor):  # a CPU tensor: no device sync
            rows = self.rows = tuple(int(r) for r in rows.tolist())
        if len(rows) != batch:
            raise GeometryError(f"rows has shape ({len(rows)},), the UNet call has B={batch} rows")
        return tuple(rows)

    def layer_kv(self, index: int, batch: int, heads: int, device: torch.device, dtype: torch.dtype) -> RegionKV:
        """Keys and values of layer `index` for the rows of this call in `attention_dtype`, weights
        folded in (cached)."""
        rows = self._rows_for(batch)
        key = (index, rows, batch, device, dtype)
        found = self._kv.get(key)
        if found is None:
            k, v = self.kv[index]
            sets = k.shape[1]
            if rows is not None:
                pick = torch.tensor(rows, dtype=torch.long, device=k.device)
                k, v = k.index_select(1, pick), v.index_select(1, pick)  # (R, B, T, C)
            elif sets not in (1, batch):
                raise GeometryError(
                    f"layer {index}: {sets} token sets for a UNet call of {batch} rows and no `rows` given"
                )
            weights = self.weights
            if isinstance(weights, torch.Tensor) and weights.ndim == 2 and weights.shape[0] != batch:
                raise GeometryError(f"weights {tuple(weights.shape)} for a UNet call of B={batch} rows")
            dtype = attention_dtype(dtype, device)  # float32 for float16 where attention may score in float16
            found = region_kv(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), heads, batch,
                              None if weights is None else weights.to(device))
            self._kv[key] = found
        return found

    def coefficients(self, hw: Size, batch: int, positions: int, regions: int, device: torch.device,
                     dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Masks (B, N, R) of grid hw for this call's rows in `dtype`, or None (M = 1)."""
        if self.coef is not None:
            found = self.coef(hw, device, dtype)
            if found is None:
                raise GeometryError(f"no masks for grid {hw[0]}x{hw[1]} in this call's masks")
            return found
        if self.masks is None:
            return None
        if hw not in self._coef:
            self._coef[hw] = self._coefficients_from_masks(hw, batch, positions, regions, device, dtype)
        return self._coef[hw]

    def _coefficients_from_masks(self, hw, batch, positions, regions, device, dtype):
        if tuple(hw) not in self.masks:
            raise GeometryError(f"no masks for grid {hw[0]}x{hw[1]}; masks hold grids {sorted(self.masks)}")
        masks = self.masks[tuple(hw)]
        if masks.shape[0] not in (1, batch):
            raise GeometryError(f"masks for grid {hw} have {masks.shape[0]} rows, the UNet call has B={batch}")
        return mask_coefficients(masks, batch, regions, positions, dtype, device)  # (B, N, R)


class _Slot:
    """What one attn2 call captured; valid only between its pre-hook and its hook."""

    __slots__ = ("armed", "applied", "x", "context", "q", "k", "q_calls", "k_calls")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.armed = self.applied = False
        self.x = self.context = self.q = self.k = None
        self.q_calls = self.k_calls = 0


_NO_CONTEXT = contextlib.nullcontext()


def _autocast_query():
    """torch.is_autocast_enabled(device_type), also on torch < 2.4 (the WebUI's 2.1), where the
    query takes no argument and is CUDA-only: picked once, not by a TypeError per attn2 call."""
    try:
        torch.is_autocast_enabled("cpu")
        return torch.is_autocast_enabled
    except TypeError:
        return lambda device_type: (torch.is_autocast_enabled() if device_type == "cuda"
                                    else torch.is_autocast_cpu_enabled())


_autocast_enabled = _autocast_query()


def plain_math(device: torch.device):
    """Our math without autocast: its inputs already have the dtypes we want, and autocast (the
    WebUI samples fp16 models under it) would add a cast around softmax and every matmul, or run
    the mask maths in half precision."""
    try:
        active = _autocast_enabled(device.type)
    except RuntimeError:  # a device type without autocast (meta)
        active = False
    return torch.autocast(device_type=device.type, enabled=False) if active else _NO_CONTEXT


def _first_arg(args: tuple, kwargs: dict, position: int, names: Sequence[str]):
    """The argument at `position` or under one of `names`, else None."""
    if len(args) > position:
        return args[position]
    for n in names:
        if kwargs.get(n) is not None:
            return kwargs[n]
    return None


class _LayerHooks:
    """The hooks of one attn2 layer around one shared slot (see the capture protocol above)."""

    def __init__(self, layer: AttnLayer, state: RegionState):
        self.layer, self.state = layer, state
        self.slot = _Slot()

    def enter(self, module, args, kwargs):
        """attn2 pre-hook: clear and arm the slot, remember the input for a fallback."""
        slot = self.slot
        slot.reset()
        slot.armed = True
        slot.x = _first_arg(args, kwargs, 0, ("x", "hidden_states"))
        slot.context = _first_arg(args, kwargs, 1, ("context", "encoder_hidden_states"))
        return None

    def capture_q(self, module, args, output):
        slot = self.slot
        if slot.armed:
            slot.q, slot.q_calls = output, slot.q_calls + 1
        return None

    def capture_k(self, module, args, output):
        slot = self.slot
        if slot.armed:
            slot.k, slot.k_calls = output, slot.k_calls + 1
        return None

    def before_out(self, module, args):
        """to_out[0] pre-hook: attention output a (B, N, C_inner) -> a + delta, once per attn2 call."""
        slot, state = self.slot, self.state
        if not (slot.armed and state.enabled) or slot.applied or len(args) != 1:
            return None
        out = args[0]
        x = slot.x
        if (not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[2] != self.layer.inner_dim
                or not isinstance(x, torch.Tensor) or tuple(out.shape[:2]) != tuple(x.shape[:2])):
            return None  # not the whole attention output (chunked?): the attn2 hook adds W_out delta
        slot.applied = True
        term = self._term(self.layer.module, out.shape[0], out.shape[1])
        slot.q = slot.k = None  # free them before the host's projection
        if term is None:
            return None
        q, kv, coef = term
        with plain_math(q.device):
            if out.dtype == q.dtype:
                new = add_region_term(out, q, kv, coef)  # in place when it can be
                return None if new is out else (new,)
            return (out + add_region_term(torch.zeros_like(q), q, kv, coef).to(out.dtype),)

    def exit(self, module, args, kwargs, output):
        """attn2 hook: clear the slot; add W_out delta when the to_out[0] route did not apply."""
        slot, state = self.slot, self.state
        applied = slot.applied
        try:
            if applied or not state.enabled:
                return None
            if not isinstance(output, torch.Tensor) or output.ndim != 3:
                raise CharacterAdapterError(
                    f"{self.layer.name}: expected attn2 to return a (B, N, C) tensor, got {type(output).__name__}"
                    + (f" {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
                )
            term = self._term(module, output.shape[0], output.shape[1])
            if term is None:
                return None
            q, kv, coef = term
            with plain_math(q.device):
                delta = add_region_term(torch.zeros_like(q), q, kv, coef)  # (B, N, C_inner)
                w_out = module.to_out[0].weight
                if w_out.dtype != delta.dtype:  # fp8 storage casts at use
                    w_out = w_out.to(delta.dtype)
                return output + F.linear(delta, w_out).to(output.dtype)  # no bias: the host added it once
        finally:
            slot.reset()  # nothing captured here outlives this call

    def _term(self, attn, batch: int, positions: int):
        """Queue this layer's text maps; return (q, RegionKV, coef) of the term, or None."""
        slot, state, layer = self.slot, self.state, self.layer
        q = slot.q
        if slot.q_calls != 1 or q is None or tuple(q.shape[:2]) != (batch, positions):
            if slot.x is None:
                raise CharacterAdapterError(f"{layer.name}: no captured q and no input to recompute it")
            q = attn.to_q(slot.x)  # the host did not call to_q once for this input: recompute, never reuse
        if state.batch is not None and state.batch != batch:
            raise GeometryError(f"{layer.name}: attn2 sees B={batch} rows, the UNet call had B={state.batch}")
        if state.latent_hw is None:
            raise CharacterAdapterError(f"{layer.name}: latent size unknown (UNet pre-hook not installed)")
        hw = downsampled_hw(state.latent_hw, layer.level)
        check_grid(hw, positions)

        if layer.index in state.map_layers and state.token_groups:
            k = slot.k
            if slot.k_calls != 1 or k is None or k.shape[0] != batch:
                k = attn.to_k(slot.context if slot.context is not None else slot.x)
            state.add_map(hw, layer.heads, q, k, state.map_rows or slice(None),
                          state.bank_keys(layer, attn.to_k, k.device, k.dtype))

        if not state.add_term:
            return None
        kv = state.layer_kv(layer.index, batch, layer.heads, q.device, q.dtype)
        coef = state.coefficients(hw, batch, positions, kv.regions, q.device, kv.keys.dtype)  # masks in kv's dtype
        return q, kv, coef


class _UNetEnter:
    """UNet pre-hook: record the latent grid and batch of this call, reset per-call maps."""

    def __init__(self, state: RegionState):
        self.state = state

    def __call__(self, module, args, kwargs):
        x = _first_arg(args, kwargs, 0, ("x", "sample"))
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise CharacterAdapterError(
                f"UNet input: expected x (B, C, h, w), got {type(x).__name__}"
                + (f" {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
            )
        state = self.state
        state.start_call((int(x.shape[-2]), int(x.shape[-1])), int(x.shape[0]))
        if state.before_call is not None:
            state.before_call(state, x)
        return None


class _UNetExit:
    """UNet forward hook: hand the call's maps to the host."""

    def __init__(self, state: RegionState):
        self.state = state

    def __call__(self, module, args, output):
        self.state.flush_maps()  # maps of map layers that did not all run
        if self.state.after_call is not None:
            self.state.after_call(self.state)
        return None


def plan_region_hooks(
    session: HookSession, unet: nn.Module, layers: Sequence[AttnLayer], state: RegionState,
) -> None:
    """Plan the UNet and per-layer hooks of the region IP term into `session` (not yet active)."""
    if len(state.kv) != len(layers):
        raise CharacterAdapterError(f"state has keys/values for {len(state.kv)} layers, the UNet has {len(layers)}")
    state.map_total = sum(1 for layer in layers if layer.index in state.map_layers)
    finest = min(layer.level for layer in layers)
    state.queue_level = (finest, min(layer.inner_dim for layer in layers if layer.level == finest))
    session.add_forward_pre_hook(unet, _UNetEnter(state), with_kwargs=True, label="unet.enter")
    session.add_forward_hook(unet, _UNetExit(state), label="unet.exit")
    for layer in layers:
        hooks = _LayerHooks(layer, state)
        attn = layer.module
        session.add_forward_pre_hook(attn, hooks.enter, with_kwargs=True, label=f"{layer.name}.enter")
        session.add_forward_hook(attn.to_q, hooks.capture_q, label=f"{layer.name}.to_q")
        if layer.index in state.map_layers:
            session.add_forward_hook(attn.to_k, hooks.capture_k, label=f"{layer.name}.to_k")
        out_proj = _out_projection(attn)
        if out_proj is not None:
            session.add_forward_pre_hook(out_proj, hooks.before_out, label=f"{layer.name}.to_out")
        session.add_forward_hook(attn, hooks.exit, with_kwargs=True, label=f"{layer.name}.exit")


def _out_projection(attn: nn.Module) -> Optional[nn.Module]:
    """attn2's output Linear (to_out[0]) when it is a module the host calls, else None."""
    to_out = getattr(attn, "to_out", None)
    try:
        first = to_out[0] if isinstance(to_out, (nn.Sequential, nn.ModuleList)) else None
    except IndexError:
        return None
    return first if isinstance(first, nn.Linear) else None
