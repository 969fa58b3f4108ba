"""Which rows of a UNet call are cond / uncond, read from the rows themselves (RowCheck)."""

from typing import Any, Optional, Sequence, Tuple

import torch

from ..fusion import COND, UNCOND
from ..hooks import HookSession


class RowCheck:
    """Which rows of a UNet call are cond / uncond, from the rows themselves, where the step's
    row plan (matched in call order) cannot know: an extra UNet call another extension makes
    within a step (Self-Attention Guidance runs the uncond rows again after CFG).

    First choice, sd-webui-controlnet's `cond_mark` (B,1,1,1), 1 = cond: its replacement of
    `diffusion_model.forward` assigns a new one on every call, after module pre-hooks ran, and
    never deletes it (HOST_NOTES §15). It is read at the call's first attn2 and trusted only if
    it was assigned during this call (another object than at UNet entry, the call's batch) and
    came from marked text rows (the UNet got one token more than attn2 does; unmarked rows, as in
    the hires pass, give all ones). Else each row's text context is compared with the step's
    cond and uncond rows (on_cfg_denoiser); rows matching both or neither leave the plan alone.
    A call whose rows disagree with the plan gets the token sets found here and gives no maps.
    Reading the rows back is a device sync, so a call that holds the step's whole batch in the
    planned order (the WebUI's default, one call per step) is trusted without a look; the check
    runs where the plan may be wrong: extra calls, and the calls of a split batch.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[Any], state: Any):
        self.unet = unet
        self.state = state
        self.corrected_calls = 0  # diagnostics and tests
        self._cond: Optional[torch.Tensor] = None  # the step's cond rows (R, T, C)
        self._uncond: Optional[torch.Tensor] = None  # the step's uncond rows (U, T, C)
        self._before: Any = None
        self._entry_tokens: Optional[int] = None
        self._pending = False
        self._session = HookSession()  # no root: clearing "stale" hooks would drop the fusion's
        self._session.add_forward_pre_hook(unet, self._enter_unet, with_kwargs=True, label="unet.rows")
        for layer in layers:
            self._session.add_forward_pre_hook(layer.module, self._enter_attn2, with_kwargs=True,
                                               label=f"{layer.name}.rows")

    def install(self) -> "RowCheck":
        self._session.install()
        return self

    def remove(self) -> None:
        self._cond = self._uncond = None
        self._session.remove()

    def begin_step(self, text_cond: Any, text_uncond: Any) -> None:
        self._cond, self._uncond = _crossattn(text_cond), _crossattn(text_uncond)

    def _enter_unet(self, module, args, kwargs) -> None:
        self._before = module.__dict__.get("cond_mark")
        context = args[2] if len(args) > 2 else kwargs.get("context")
        self._entry_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        self._pending = True

    def _enter_attn2(self, module, args, kwargs) -> None:
        if not self._pending:
            return
        self._pending = False
        state = self.state
        if not state.enabled or state.rows is None or getattr(state, "planned", False):
            return
        context = args[1] if len(args) > 1 else kwargs.get("context")
        marked = isinstance(context, torch.Tensor) and context.ndim == 3 and self._entry_tokens == context.shape[1] + 1
        rows = self._from_cond_mark(state.batch) if marked else None
        if rows is None:
            rows = self._from_context(context, state.batch)
        if rows is None or rows == tuple(int(r) for r in state.rows):
            return
        state.rows = rows
        state.token_groups = None
        self.corrected_calls += 1

    def _from_cond_mark(self, batch: Optional[int]) -> Optional[Tuple[int, ...]]:
        mark = self.unet.__dict__.get("cond_mark")
        if mark is self._before or not isinstance(mark, torch.Tensor) or mark.numel() != batch:
            return None
        return tuple(COND if m > 0.5 else UNCOND for m in mark.detach().reshape(-1).float().cpu().tolist())

    def _from_context(self, context: Any, batch: Optional[int]) -> Optional[Tuple[int, ...]]:
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != batch:
            return None
        if self._cond is None or self._uncond is None:
            return None
        is_uncond, is_cond = _starts_like(context, self._uncond), _starts_like(context, self._cond)
        if is_uncond is None or is_cond is None:
            return None
        is_uncond, is_cond = torch.stack((is_uncond, is_cond)).cpu()  # one device sync per UNet call
        if not bool((is_uncond ^ is_cond).all()):
            return None  # a row like both (same prompt and negative) or like neither
        return tuple(UNCOND if u else COND for u in is_uncond.tolist())


def _crossattn(cond: Any) -> Optional[torch.Tensor]:
    """The text rows (N, T, C) of a CFG cond: a tensor, or SDXL's dict."""
    tensor = cond.get("crossattn") if isinstance(cond, dict) else cond
    return tensor.detach() if isinstance(tensor, torch.Tensor) and tensor.ndim == 3 else None


def _starts_like(context: torch.Tensor, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) bool: context row b equals one of `rows` over their common length. Padding the host
    adds after on_cfg_denoiser (pad_cond_uncond, stacked AND rows) only appends tokens."""
    if context.shape[-1] != rows.shape[-1]:
        return None
    tokens = min(context.shape[1], rows.shape[1])
    a = context.detach()[:, None, :tokens]
    b = rows[None, :, :tokens].to(device=a.device, dtype=a.dtype)
    return (a == b).flatten(2).all(dim=-1).any(dim=-1)
