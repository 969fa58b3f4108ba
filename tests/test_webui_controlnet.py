"""Character-Adapter next to sd-webui-controlnet, with tests/webui_double/controlnet_double.py.

That double reproduces what sd-webui-controlnet (Mikubill, main 56cec5b) does to the model while a
unit is enabled (its docstring cites scripts/hook.py UnetHook.hook/restore, mark/unmark_prompt_context
and scripts/ipadapter/plugable_ipadapter.py hack_blk/attn_forward_hacked/clear_all_ip_adapter):
marker rows on the conditioning, the UNet `forward` replaced by an instance attribute, and with its
IP-Adapter each attn2 `forward` replaced by its own attention that adds its IP terms before to_out.

The stand-in script below calls it where ControlNet does: `process` installs (Script.process ->
controlnet_hack), `postprocess` restores. "ControlNet first" is that real order: its forwards are
replaced before our hooks go in (process_before_every_sampling). "Ours first" installs ControlNet
after our hooks (at process_before_every_sampling, after our script), as happens when ControlNet
re-hooks in before_process_batch (the refiner path) while our hooks from batch 1 are in place.
"""

import pytest
import torch
import torch.nn.functional as F

from webui_host import generate, ours, pixels, plain, reference_image  # sets sys.path
from charadapter.webui import caches as ca_caches
from charadapter.images import load_image
from charadapter.adapter import RegionEncoder
from charadapter.layers import find_attn2_layers
from controlnet_double import ControlNetDouble, PoseControl, mark_prompt_context, openpose_hint
from charadapter.params import Character, Params
from modules import processing, scripts

ORDERS = ("controlnet_first", "ours_first")


class ControlNetStandIn(scripts.Script):
    """An AlwaysOn script doing to the model what ControlNet does with one unit enabled."""

    def __init__(self, order, ip_term=None, control=None):
        super().__init__()
        self.order, self.ip_term, self.control = order, ip_term, control
        self.cn = ControlNetDouble()
        self.seen = {}

    def title(self):
        return "ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        if self.order == "controlnet_first":
            self.cn.hook(p, p.sd_model.model.diffusion_model, self.ip_term, self.control)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.order == "ours_first":
            mark_prompt_context(kwargs["c"], positive=True)  # what its p.sample wrapper does, in place
            mark_prompt_context(kwargs["uc"], positive=False)
            self.cn.hook(p, p.sd_model.model.diffusion_model, self.ip_term, self.control)

    def post_sample(self, p, ps, *args):
        unet = p.sd_model.model.diffusion_model
        attn = find_attn2_layers(unet)[0].module
        gen = self.ours.hooks.controller.generation if getattr(self, "ours", None) else None
        self.seen = dict(our_hooks=ours(unet), unet_forward=unet.__dict__.get("forward"),
                         characters=gen.fusion.counts if gen is not None and gen.fusion is not None else None,
                         cn_forward=self.cn_forward(unet), attn_forward=attn.__dict__.get("forward"))

    @staticmethod
    def cn_forward(unet):
        return unet.__dict__.get("forward") if "_original_forward" in unet.__dict__ else None

    def postprocess(self, p, processed, *args):
        self.cn.restore()
        unet = p.sd_model.model.diffusion_model
        self.restored = (unet.__dict__.get("forward"),
                         [layer.module.__dict__.get("forward") for layer in find_attn2_layers(unet)])


def with_controlnet(runner, script, order, ip_term=None, control=None):
    """Put the stand-in into the runner before (ControlNet first) or after our script."""
    stand_in = ControlNetStandIn(order, ip_term, control)
    stand_in.ours = script
    stand_in.args_from = stand_in.args_to = len(runner.inputs)  # no UI controls
    stand_in.alwayson = True
    position = runner.alwayson_scripts.index(script) + (0 if order == "controlnet_first" else 1)
    runner.alwayson_scripts.insert(position, stand_in)
    runner.scripts.insert(runner.scripts.index(script) + (0 if order == "controlnet_first" else 1), stand_in)
    return stand_in


def remove(runner, stand_in):
    runner.alwayson_scripts.remove(stand_in)
    runner.scripts.remove(stand_in)


def ip_adapter_term(unet, weight=0.8):
    """An IP-Adapter term as ControlNet's attn_forward_hacked calls it: f(attn2, x, q) before to_out.

    Same tiny adapter and image tokens as ours (one region = the whole image); the row's tokens
    are picked by unet.cond_mark (1 = cond: the image tokens, 0 = uncond: the negative tokens),
    as ControlNet's ImageEmbed.eval does.
    """
    weights = ca_caches.ADAPTER_CACHE.get("tiny-adapter")
    tokens = RegionEncoder(weights, ca_caches.ENCODER_CACHE.get("tiny-encoder")).encode([load_image(reference_image())])
    kv = {layer.module: weights.layers[layer.index] for layer in find_attn2_layers(unet)}

    def term(attn, x, q):  # q: (B, heads, N, d)
        mark = unet.cond_mark.reshape(-1, 1, 1).to(q.dtype)
        context = mark * tokens.cond[0] + (1 - mark) * tokens.negative  # (B, T, C)
        k_w, v_w = kv[attn]
        batch, heads, _, dim = q.shape
        k, v = (F.linear(context, w.to(q.dtype)).view(batch, -1, heads, dim).transpose(1, 2) for w in (k_w, v_w))
        out = F.scaled_dot_product_attention(q, k, v)
        return weight * out.transpose(1, 2).reshape(batch, -1, heads * dim)

    return term


@pytest.mark.parametrize("order", ORDERS)
def test_a_unit_without_ip_adapter_leaves_our_image_unchanged(host, sd_model, order):
    """OpenPose and friends: marker rows + UNet forward replacement (no control residual in the double)."""
    runner, script = host
    _, alone = generate(script, runner, steps=3)
    stand_in = with_controlnet(runner, script, order)
    _, together = generate(script, runner, steps=3)
    assert stand_in.seen["cn_forward"] is not None and stand_in.seen["our_hooks"] > 0  # both were active
    assert torch.equal(pixels(together), pixels(alone))
    assert ours(sd_model.model.diffusion_model) == 0


@pytest.mark.parametrize("order", ORDERS)
def test_both_ip_adapters_apply_and_each_cleans_up_its_own(host, sd_model, order):
    runner, script = host
    unet = sd_model.model.diffusion_model
    _, ours_alone = generate(script, runner, steps=3)
    term = ip_adapter_term(unet)
    stand_in = with_controlnet(runner, script, order, term)
    cn_alone = plain(runner, script, steps=3)
    _, both = generate(script, runner, steps=3)

    seen = stand_in.seen  # during sampling: ControlNet's replaced forwards and our hooks, together
    assert seen["our_hooks"] > 0 and seen["cn_forward"] is not None
    assert seen["attn_forward"] is not None and seen["attn_forward"].__func__.__name__ == "attn_forward_hacked"
    assert not torch.equal(pixels(both), pixels(cn_alone))   # ours applies under ControlNet's attention
    assert not torch.equal(pixels(both), pixels(ours_alone))  # ControlNet's applies beside our hooks
    # after the run: our hooks are gone and what ControlNet restored is what is there, untouched by us
    assert ours(unet) == 0
    unet_forward, attn_forwards = stand_in.restored
    assert unet.__dict__.get("forward") is unet_forward
    assert [layer.module.__dict__.get("forward") for layer in find_attn2_layers(unet)] == attn_forwards
    assert not any(getattr(layer.module, "ipadapter_hacks", None) for layer in find_attn2_layers(unet))
    remove(runner, stand_in)
    assert torch.equal(pixels(generate(script, runner, steps=3)[1]), pixels(ours_alone))


def test_plain_ip_adapter_mode_agrees_with_controlnets_ip_adapter(host, sd_model):
    """"regions": [] is one region over the whole image: a plain IP-Adapter. The same weights and
    tokens through ControlNet's path (its own attention + its term before to_out) give the same image."""
    runner, script = host
    unet = sd_model.model.diffusion_model
    _, ours_global = generate(script, runner, steps=3, params=dict(regions=(), weight=0.8))
    nothing = plain(runner, script, steps=3)
    stand_in = with_controlnet(runner, script, "controlnet_first", ip_adapter_term(unet, weight=0.8))
    cn_global = plain(runner, script, steps=3)
    remove(runner, stand_in)
    difference = (pixels(ours_global) - pixels(cn_global)).abs().max().item()
    effect = (pixels(ours_global) - pixels(nothing)).abs().max().item()
    assert difference <= 2 and effect > 20, (difference, effect)


def second_reference():
    from PIL import Image

    img = Image.new("RGB", (72, 96), (40, 40, 60))
    img.paste((250, 220, 200), (24, 4, 48, 28))
    img.paste((160, 160, 170), (10, 28, 62, 64))
    img.paste((90, 60, 30), (18, 64, 54, 94))
    return img


def two_characters(runner, script, enabled=True):
    """A girl (left) and a knight (right): one reference each, the regions as the panel's defaults."""
    params = Params(enabled=enabled, characters=(
        Character(image=reference_image(), model="tiny-adapter", subject="girl"),
        Character(image=second_reference(), model="tiny-adapter", subject="knight", weight=1.0, unit=2)))
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="a girl on the left and a knight on the right, face, upper body, lower body", negative_prompt="",
        batch_size=1, steps=3, width=64, height=64, sampler_name="Euler", seed=7)
    p.scripts = runner
    full = [0] * script.args_to
    full[script.args_from:script.args_to] = params.to_args()
    p.script_args = tuple(full)
    return processing.process_images(p)


@pytest.mark.parametrize("order", ORDERS)
def test_two_figures_posed_by_openpose_with_two_references(host, sd_model, order):
    """An OpenPose unit with two skeletons poses the picture; two characters, one reference each,
    keep who is who. Both extensions apply; afterwards each has removed only its own changes."""
    runner, script = host
    unet = sd_model.model.diffusion_model
    pose = PoseControl(openpose_hint(64, [(0.27, 0.9), (0.73, 0.8)]), weight=1.0, seed=5)
    ours_alone = two_characters(runner, script)
    stand_in = with_controlnet(runner, script, order, control=pose)
    pose_alone = two_characters(runner, script, enabled=False)
    both = two_characters(runner, script)
    seen = stand_in.seen
    assert seen["our_hooks"] > 0 and seen["cn_forward"] is not None and seen["characters"] == (3, 3)
    assert not torch.equal(pixels(both), pixels(pose_alone))  # the characters apply under the posed UNet
    assert not torch.equal(pixels(both), pixels(ours_alone))  # the pose applies beside our hooks
    assert not torch.equal(pixels(pose_alone), pixels(plain(runner, script, steps=3)))  # the unit does something
    assert ours(unet) == 0 and unet.__dict__.get("forward") is stand_in.restored[0]  # what ControlNet restored
    remove(runner, stand_in)
    assert torch.equal(pixels(two_characters(runner, script)), pixels(ours_alone))
