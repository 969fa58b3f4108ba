"""Forward hooks that add the region IP term to the host's attn2 output, installed all or nothing
and always removed.

Nothing here assigns ``forward``: the WebUI swaps CrossAttention.forward at class level for its
attention optimisation, and other extensions patch instances; module hooks fire around whatever
forward is in place. Per-generation data lives in a `RegionState` handed to the hooks, never on
modules.

Capture protocol per attn2 layer (a `_Slot` per layer, valid for one attn2 call only):
  attn2 pre-hook   clears the slot and arms it (so nothing from an earlier call survives);
  to_q hook        stores the host's q (B, N, C_inner) while armed; to_k the same for text maps;
  attn2 hook       takes q (and k), disarms and clears the slot, returns output + W_out delta.
If the host did not call to_q exactly once with the attn2 input, q is recomputed with the
module's own to_q, so a missing or doubled capture can never pair a wrong q with this call.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import region_ip_delta, text_region_maps
from .errors import CharacterAdapterError, GeometryError
from .geometry import Size, check_grid, downsampled_hw
from .layers import AttnLayer

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
    reference tokens for cond rows, 1 = the negative tokens for uncond rows). `rows` picks the
    token set of each row of the current UNet call. `masks` maps a layer grid (h, w) to region
    masks (B, R, N) (see masks.mask_pyramid); None means M = 1. `kv` is fixed for the life of
    the state (its device/dtype copies are cached): make a new state when the tokens change.
    """

    kv: Sequence[Tuple[torch.Tensor, torch.Tensor]]
    weights: torch.Tensor                                    # (R,) or (B, R): w * w_r
    rows: Optional[torch.Tensor] = None                      # (B,) long; None: S == 1 or S == B
    masks: Optional[Dict[Size, torch.Tensor]] = None
    map_layers: FrozenSet[int] = frozenset()                 # layer indices whose text maps are recorded
    token_groups: Optional[Sequence[Sequence[int]]] = None   # text key columns of each region phrase
    before_call: Optional[Callable[["RegionState", torch.Tensor], None]] = None  # (state, x) at UNet entry
    after_call: Optional[Callable[["RegionState"], None]] = None                 # at UNet exit
    enabled: bool = True
    # written by the hooks, per UNet call
    latent_hw: Optional[Size] = None
    batch: Optional[int] = None
    maps: Dict[int, Tuple[Size, torch.Tensor]] = field(default_factory=dict)  # layer -> (hw, (B, R, N))
    _kv_cache: Dict[Tuple[int, torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def layer_kv(self, index: int, batch: int, device: torch.device, dtype: torch.dtype):
        """Keys and values (R, B, T, C_inner) of layer `index` for the rows of this call."""
        key = (index, device, dtype)
        if key not in self._kv_cache:
            k, v = self.kv[index]
            self._kv_cache[key] = (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
        k, v = self._kv_cache[key]
        sets = k.shape[1]
        rows = self.rows
        if rows is None:
            if sets == 1:
                return k, v  # (R, 1, T, C): broadcast over rows
            if sets != batch:
                raise GeometryError(
                    f"layer {index}: {sets} token sets for a UNet call of {batch} rows and no `rows` given"
                )
            return k, v
        if rows.shape != (batch,):
            raise GeometryError(f"rows has shape {tuple(rows.shape)}, the UNet call has B={batch} rows")
        rows = rows.to(device)
        return k.index_select(1, rows), v.index_select(1, rows)  # (R, B, T, C)

    def layer_masks(self, hw: Size, batch: int) -> Optional[torch.Tensor]:
        """Region masks (B, R, N) for grid hw, or None when masks are off."""
        if self.masks is None:
            return None
        if tuple(hw) not in self.masks:
            raise GeometryError(f"no masks for grid {hw[0]}x{hw[1]}; masks hold grids {sorted(self.masks)}")
        m = self.masks[tuple(hw)]
        if m.shape[0] not in (1, batch):
            raise GeometryError(f"masks for grid {hw} have {m.shape[0]} rows, the UNet call has B={batch}")
        return m


class _Slot:
    """What one attn2 call captured; valid only between its pre-hook and its hook."""

    __slots__ = ("armed", "x", "context", "q", "k", "q_calls", "k_calls")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.armed = False
        self.x = self.context = self.q = self.k = None
        self.q_calls = self.k_calls = 0


def _first_arg(args: tuple, kwargs: dict, position: int, names: Sequence[str]):
    """The argument at `position` or under one of `names`, else None."""
    if len(args) > position:
        return args[position]
    for n in names:
        if kwargs.get(n) is not None:
            return kwargs[n]
    return None


class _Attn2Enter:
    """attn2 pre-hook: clear and arm the slot, remember the input for a fallback."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot.reset()
        self.slot.armed = True
        self.slot.x = _first_arg(args, kwargs, 0, ("x", "hidden_states"))
        self.slot.context = _first_arg(args, kwargs, 1, ("context", "encoder_hidden_states"))
        return None


class _Capture:
    """to_q / to_k forward hook: store the host's projection while the slot is armed."""

    def __init__(self, slot: _Slot, which: str):
        self.slot, self.which = slot, which

    def __call__(self, module, args, output):
        slot = self.slot
        if slot.armed:
            if self.which == "q":
                slot.q, slot.q_calls = output, slot.q_calls + 1
            else:
                slot.k, slot.k_calls = output, slot.k_calls + 1
        return None


class _Attn2Exit:
    """attn2 forward hook: add W_out · region_ip_delta to the host output; record text maps."""

    def __init__(self, layer: AttnLayer, slot: _Slot, state: RegionState):
        self.layer, self.slot, self.state = layer, slot, state

    def __call__(self, module, args, kwargs, output):
        slot = self.slot
        x, context, q, k = slot.x, slot.context, slot.q, slot.k
        q_ok, k_ok = slot.q_calls == 1, slot.k_calls == 1
        slot.reset()  # nothing captured here outlives this call
        state = self.state
        if not state.enabled:
            return None
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            raise CharacterAdapterError(
                f"{self.layer.name}: expected attn2 to return a (B, N, C) tensor, got {type(output).__name__}"
                + (f" {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
            )
        batch, positions = output.shape[:2]
        if not q_ok or q is None or tuple(q.shape[:2]) != (batch, positions):
            if x is None:
                raise CharacterAdapterError(f"{self.layer.name}: no captured q and no input to recompute it")
            q = module.to_q(x)  # the host did not call to_q once for this input: recompute, never reuse
        if state.batch is not None and state.batch != batch:
            raise GeometryError(
                f"{self.layer.name}: attn2 sees B={batch} rows, the UNet call had B={state.batch}"
            )
        if state.latent_hw is None:
            raise CharacterAdapterError(f"{self.layer.name}: latent size unknown (UNet pre-hook not installed)")
        hw = downsampled_hw(state.latent_hw, self.layer.level)
        check_grid(hw, positions)

        if self.layer.index in state.map_layers and state.token_groups:
            if not k_ok or k is None or k.shape[0] != batch:
                k = module.to_k(context if context is not None else x)
            state.maps[self.layer.index] = (hw, text_region_maps(q, k, self.layer.heads, state.token_groups))

        keys, values = state.layer_kv(self.layer.index, batch, q.device, q.dtype)
        masks = state.layer_masks(hw, batch)
        weights = state.weights.to(q.device) if isinstance(state.weights, torch.Tensor) else state.weights
        delta = region_ip_delta(q, keys, values, self.layer.heads, masks, weights)  # (B, N, C_inner)
        w_out = module.to_out[0].weight
        if w_out.dtype != delta.dtype:  # fp8 storage casts at use
            w_out = w_out.to(delta.dtype)
        return output + F.linear(delta, w_out).to(output.dtype)  # no bias: the host added it once


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
        state.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        state.batch = int(x.shape[0])
        state.maps.clear()
        if state.before_call is not None:
            state.before_call(state, x)
        return None


class _UNetExit:
    """UNet forward hook: hand the call's maps to the host."""

    def __init__(self, state: RegionState):
        self.state = state

    def __call__(self, module, args, output):
        if self.state.after_call is not None:
            self.state.after_call(self.state)
        return None


def plan_region_hooks(
    session: HookSession, unet: nn.Module, layers: Sequence[AttnLayer], state: RegionState,
) -> None:
    """Plan the UNet and per-layer hooks of the region IP term into `session` (not yet active)."""
    if len(state.kv) != len(layers):
        raise CharacterAdapterError(f"state has keys/values for {len(state.kv)} layers, the UNet has {len(layers)}")
    session.add_forward_pre_hook(unet, _UNetEnter(state), with_kwargs=True, label="unet.enter")
    session.add_forward_hook(unet, _UNetExit(state), label="unet.exit")
    for layer in layers:
        slot = _Slot()
        attn = layer.module
        session.add_forward_pre_hook(attn, _Attn2Enter(slot), with_kwargs=True, label=f"{layer.name}.enter")
        session.add_forward_hook(attn.to_q, _Capture(slot, "q"), label=f"{layer.name}.to_q")
        if layer.index in state.map_layers:
            session.add_forward_hook(attn.to_k, _Capture(slot, "k"), label=f"{layer.name}.to_k")
        session.add_forward_hook(attn, _Attn2Exit(layer, slot, state), with_kwargs=True, label=f"{layer.name}.exit")
