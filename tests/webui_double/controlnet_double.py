"""What sd-webui-controlnet (Mikubill, main) does to the model while a unit is enabled (double-only helper).

Read from scripts/hook.py (mark_prompt_context, unmark_prompt_context, UnetHook.hook / restore) and
scripts/ipadapter/plugable_ipadapter.py (hack_blk, attn_forward_hacked, clear_all_ip_adapter):

* p.sample is replaced (instance attribute) by a function that prepends ONE marker token row
  (+1024 cond / -1024 uncond) to every cond tensor of p's conditioning, in place, then calls the
  original p.sample. So CFGDenoiserParams.text_cond / text_uncond and the process_before_every_sampling
  c / uc carry T + 1 tokens. hr_c / hr_uc are marked only if they already exist when sampling starts.
* diffusion_model.forward is replaced (instance attribute; the original kept as _original_forward).
  The new forward strips the marker row and stores `diffusion_model.cond_mark` (B, 1, 1, 1),
  1.0 = cond row, 0.0 = uncond row; unmarked context gives all ones. cond_mark is never deleted.
  Module hooks still fire: a forward-pre-hook on the UNet sees the marked context, attn2 sees it stripped.
* Its IP-Adapter replaces each attn2's forward (instance attribute) with its own SDP attention
  that adds every function in attn2.ipadapter_hacks to the attention output before to_out. It does
  not call the previous forward (no chaining with other replacements); register_forward_hook still fires.
* A ControlNet unit (OpenPose, Depth, ...): the new forward runs the UNet's blocks itself
  (hook.py UnetHook.hook.forward, "U-Net Encoder" / "Middle Block" / "Decoder") and adds the control
  model's residuals: one per input block and one for the middle block (SD1: 13), scaled by the unit's
  weight, added to the middle block's output and to each skip connection as the decoder takes it
  (aligned_adding: resized with "nearest" when the grids differ). The control model here is a
  stand-in, not a trained ControlNet: each residual is the hint image's brightness, area-resized to
  that block's grid, times a fixed random vector over the block's channels (`PoseControl`).
"""
import torch

POSITIVE_MARK_TOKEN = 1024  # mirrors sd-webui-controlnet scripts/hook.py
NEGATIVE_MARK_TOKEN = -POSITIVE_MARK_TOKEN
MARK_EPS = 1e-3


def prompt_context_is_marked(x):  # mirrors scripts/hook.py (prompt_context_is_marked)
    t = x[..., 0, :]
    m = torch.abs(t) - POSITIVE_MARK_TOKEN
    m = torch.mean(torch.abs(m)).detach().cpu().float().numpy()
    return float(m) < MARK_EPS


def mark_prompt_context(x, positive):  # mirrors scripts/hook.py (mark_prompt_context), our own code
    """Prepend the marker row to every ScheduledPromptConditioning inside x (in place where x is a container)."""
    from modules.prompt_parser import MulticondLearnedConditioning, ComposableScheduledPromptConditioning, ScheduledPromptConditioning
    if isinstance(x, list):
        for i in range(len(x)):
            x[i] = mark_prompt_context(x[i], positive)
        return x
    if isinstance(x, MulticondLearnedConditioning):
        x.batch = mark_prompt_context(x.batch, positive)
        return x
    if isinstance(x, ComposableScheduledPromptConditioning):
        x.schedules = mark_prompt_context(x.schedules, positive)
        return x
    if isinstance(x, ScheduledPromptConditioning):
        cond = x.cond['crossattn'] if isinstance(x.cond, dict) else x.cond
        if prompt_context_is_marked(cond):
            return x
        mark = POSITIVE_MARK_TOKEN if positive else NEGATIVE_MARK_TOKEN
        cond = torch.cat([torch.zeros_like(cond)[:1] + mark, cond], dim=0)
        if isinstance(x.cond, dict):
            cond = dict(crossattn=cond, vector=x.cond['vector'])
        return ScheduledPromptConditioning(end_at_step=x.end_at_step, cond=cond)
    return x


def unmark_prompt_context(x):  # mirrors scripts/hook.py (unmark_prompt_context)
    """(cond_mark (B,1,1,1), uc indices, c indices, context without the marker row)."""
    if not prompt_context_is_marked(x):
        return torch.ones(size=(x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device), [], [], x
    mark = x[:, 0, :]
    context = x[:, 1:, :]
    mark = (torch.mean(torch.abs(mark - NEGATIVE_MARK_TOKEN), dim=1) > MARK_EPS).float()
    mark_batch = mark[:, None, None, None].to(x.dtype).to(x.device)
    mark = mark.tolist()
    return mark_batch, [i for i, v in enumerate(mark) if v < 0.5], [i for i, v in enumerate(mark) if not v < 0.5], context


def attn_forward_hacked(self, x, context=None, **kwargs):  # mirrors scripts/ipadapter/plugable_ipadapter.py (attn_forward_hacked)
    batch_size, _, inner_dim = x.shape
    h = self.heads
    head_dim = inner_dim // h
    context = x if context is None else context
    q, k, v = (t.view(batch_size, -1, h, head_dim).transpose(1, 2) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, h * head_dim)
    for f in self.ipadapter_hacks:
        out = out + f(self, x, q)
    return self.to_out(out)


def attn2_modules(unet):
    """attn2 modules in ControlNet's IP-Adapter order: input blocks, output blocks, then the middle block."""
    found = []
    for blocks in (unet.input_blocks, unet.output_blocks, [unet.middle_block]):
        for block in blocks:
            for module in block.modules():
                if hasattr(module, "attn2"):
                    found.append(module.attn2)
    return found


def aligned_adding(base, x):  # mirrors scripts/hook.py (aligned_adding), without the inpaint channel alignment
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    if x.shape[-2:] != base.shape[-2:] and (x.shape[-2] > 1 or x.shape[-1] > 1):
        x = torch.nn.functional.interpolate(x, size=tuple(base.shape[-2:]), mode="nearest")
    return base + x


def openpose_hint(size, figures):
    """A pose map (1, 1, H, W) in [0, 1]: one stick figure per (centre x, height) fraction pair, drawn as
    OpenPose draws limbs on black (the stand-in control model only reads brightness)."""
    from PIL import Image, ImageDraw
    import numpy as np

    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    width = max(1, size // 32)
    for cx, height in figures:
        x, top, bottom = cx * size, (1 - height) * size, size * 0.97
        neck, hip = top + 0.18 * (bottom - top), top + 0.55 * (bottom - top)
        head = 0.08 * (bottom - top)
        draw.ellipse((x - head, top, x + head, top + 2 * head), outline=255, width=width)
        draw.line((x, neck, x, hip), fill=255, width=width)  # spine
        draw.line((x - 0.15 * size, neck + 0.05 * size, x + 0.15 * size, neck + 0.05 * size), fill=255, width=width)
        draw.line((x, hip, x - 0.08 * size, bottom), fill=255, width=width)  # legs
        draw.line((x, hip, x + 0.08 * size, bottom), fill=255, width=width)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]


class PoseControl:  # double-only: a stand-in for a ControlNet model's output, fixed per block
    def __init__(self, hint, weight=1.0, seed=0):
        self.hint, self.weight, self.seed = hint, weight, seed

    def residuals(self, shapes, like):
        """One residual per input block and one for the middle block (their output shapes, in the order
        hook.py stacks them), in `like`'s device and dtype."""
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for shape in shapes:
            grid = torch.nn.functional.interpolate(self.hint, size=tuple(shape[-2:]), mode="area")  # (1, 1, h, w)
            channels = torch.randn(shape[1], generator=gen).view(1, -1, 1, 1)
            out.append((self.weight * channels * grid).to(like.device, like.dtype).expand(shape[0], -1, -1, -1))
        return out


def controlled_forward(unet, x, timesteps, context, control):  # mirrors scripts/hook.py (UnetHook.hook.forward), one ControlNet unit
    from ldm.modules.diffusionmodules.util import timestep_embedding

    hs = []
    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
        h = x
        for module in unet.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = unet.middle_block(h, emb, context)
    # ControlNet computes these before the encoder with its own model; the stand-in needs only the shapes
    total_controlnet_embedding = control.residuals([t.shape for t in hs] + [h.shape], h)
    h = aligned_adding(h, total_controlnet_embedding.pop())
    for module in unet.output_blocks:
        h = torch.cat([h, aligned_adding(hs.pop(), total_controlnet_embedding.pop())], dim=1)
        h = module(h, emb, context)
    h = h.type(x.dtype)
    return unet.out(h)


class ControlNetDouble:  # double-only: UnetHook.hook / restore + PlugableIPAdapter.hook, reduced to their effect on the model
    def __init__(self):
        self.unet = None
        self.hacked = []

    def hook(self, p, unet, ip_adapter_term=None, control=None):
        """Install the prompt marking, the UNet forward replacement (running `control`'s residuals, a
        PoseControl, when given), and (optionally) IP-Adapter attn2 hacks."""
        self.unet = unet
        if getattr(p, 'sample_before_CN_hack', None) is None:
            p.sample_before_CN_hack = p.sample

        def process_sample(*args, **kwargs):
            mark_prompt_context(kwargs.get('conditioning', []), positive=True)
            mark_prompt_context(kwargs.get('unconditional_conditioning', []), positive=False)
            mark_prompt_context(getattr(p, 'hr_c', []), positive=True)
            mark_prompt_context(getattr(p, 'hr_uc', []), positive=False)
            return p.sample_before_CN_hack(*args, **kwargs)

        p.sample = process_sample
        original_forward = unet.forward

        def forward(x, timesteps=None, context=None, **kwargs):
            cond_mark, _, _, context = unmark_prompt_context(context)
            unet.cond_mark = cond_mark
            if control is not None:
                return controlled_forward(unet, x, timesteps, context, control)
            return original_forward(x, timesteps, context, **kwargs)

        unet._original_forward = original_forward
        unet.forward = forward

        if ip_adapter_term is not None:
            for attn in attn2_modules(unet):
                if not getattr(attn, "ipadapter_hacks", None):
                    attn.ipadapter_hacks = []
                    self.hacked.append((attn, attn.forward))
                    attn.forward = attn_forward_hacked.__get__(attn, type(attn))
                attn.ipadapter_hacks.append(ip_adapter_term)

    def restore(self):
        """Undo the forward replacements; like ControlNet, leave unet.cond_mark behind."""
        for attn, forward in self.hacked:
            attn.forward = forward
            attn.ipadapter_hacks = []
        self.hacked = []
        if self.unet is not None and hasattr(self.unet, "_original_forward"):
            self.unet.forward = self.unet._original_forward
            del self.unet._original_forward
