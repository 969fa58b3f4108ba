"""Train the toy world's models from scratch, with a fixed seed: `python -m toyworld.train`.

Stage 1, the text-to-image model: epsilon-prediction on synthetic characters and captions, text
encoder trained jointly, 10 % caption dropout, AdamW + warm-up, EMA weights saved.
Stage 2, the image encoder: the toy CLIP has no pretraining, so it first learns what a real CLIP
already sees: a linear read-out of its image embeds names the character's skin, garment colours
and stripes from a rendering (whole, or a strip of one region: only what the strip shows). No UNet.
Stage 3, the IP-Adapter the IP-Adapter way, base and encoder frozen: to_k_ip / to_v_ip start
from the text attention's to_k / to_v (IP-Adapter's initialisation); the reference is ANOTHER
rendering of the target's character (other background, position and size), whole or, half of
the time, a full-width strip of one region padded to a square (the crop Character-Adapter feeds
a region), so the adapter learns who the character is rather than where its pixels are; captions
omit a region's colour 80 % of the time; 10 % image dropout to the negative tokens, 10 % text
dropout. Besides the epsilon-MSE, a distillation term pulls the prediction towards the base
model's own under a teacher caption that names the colours the reference shows; timesteps 50..950,
each weighted by 1 / the base error at t (the small t, where the pixels already show the colours,
would rule the loss); within the figure, face, jacket and trousers weigh the same
(region_balance). The image term goes through the extension's own hooks (charadapter.hooks), so
training and inference add it with the same code. Every 50 steps it logs the teacher-forced gain of the
plain adapter on held-out characters (toyworld.teacher's measurement, reduced): the loss barely
moves when the adapter starts to help.

Every 150 base steps the segmentation IoU of the EMA model on 24 held-out references is logged:
the loss says little about whether the text maps localise yet.

`--skip-base` reuses the saved base model and trains stages 2 and 3 only; `--skip-clip` also the
image encoder (stage 3 only); `--adapter-from FILE --first-example N` goes on from an adapter file. Two threads (this
machine's cores) by default; on a shared, busy machine `--threads 1` was faster.
"""

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from charadapter.clip_vision import preprocess_images
from charadapter.hooks import HookSession, RegionState, plan_region_hooks
from charadapter.images import GREY, pad_to_square
from charadapter.layers import find_attn2_layers

from . import data
from .model import CLIP_DIR, WEIGHTS, ToyAdapter, build_clip, build_sd, save_image_side, save_sd

SEED = 1234


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine down to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


PROBE_TIMESTEPS = (50, 150)


def probe(model, samples) -> str:
    """Segmentation IoU of the EMA model on held-out references: whether the text maps localise
    yet (the loss says little about that)."""
    from .evaluate import segmentation_iou
    from .world import TextWorld

    world = TextWorld(model)
    parts = []
    for t in PROBE_TIMESTEPS:
        v = segmentation_iou(world, samples, t)
        parts.append(f"T{t} {v['face']:.2f}/{v['jacket']:.2f}/{v['trousers']:.2f} mean {v['mean']:.3f}")
    return "; ".join(parts)


def train_base(steps: int, batch_size: int, out: str, save_every: int = 300, probe_every: int = 150):
    """Stage 1. Returns the EMA model."""
    torch.manual_seed(SEED)
    model = build_sd(SEED)
    model.train()
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(SEED)
    probe_samples = data.held_out(24, offset=5000) if probe_every else []
    t0, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-3, 50, steps)
        images, captions, _ = data.batch(range(step * batch_size, (step + 1) * batch_size))
        captions = [c if torch.rand((), generator=gen) >= 0.1 else "" for c in captions]
        x0 = torch.from_numpy(images)
        t = torch.randint(0, model.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        eps = model.apply_model(model.q_sample(x0, t, noise), t, model.get_learned_conditioning(captions))
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"base step {step}/{steps} loss {running:.4f} ({time.time() - t0:.0f} s)")
        if probe_every and ((step + 1) % probe_every == 0 or step == steps - 1):
            log(f"base step {step + 1} probe IoU (EMA, 24 held-out): {probe(ema, probe_samples)}")
        if (step + 1) % save_every == 0 or step == steps - 1:
            save_sd(ema, out)
    return ema


def strip_of(image: np.ndarray, masks: np.ndarray, region: int, rng: np.random.Generator) -> Image.Image:
    """A full-width band around one region's rows (jittered), padded to a square: the kind of crop
    Character-Adapter feeds the adapter for a region."""
    rows = np.flatnonzero(masks[region].any(axis=1))
    top = max(0, int(rows[0]) - int(rng.integers(0, 3)))
    bottom = min(data.SIZE, int(rows[-1]) + 1 + int(rng.integers(0, 3)))
    return pad_to_square(data.to_pil(image).crop((0, top, data.SIZE, bottom)), GREY)


ADAPTER_OMIT_COLOUR = 0.8  # captions of stage 2 name a region's colour less often: the reference must
WHOLE_P = 0.5  # a reference is the whole picture this often, else a strip of one region


def reference_view(character: data.Character, avoid: Optional[data.Layout],
                   rng: np.random.Generator) -> Tuple[Image.Image, Optional[int]]:
    """Another rendering of the character (standing, another background, position and size than
    `avoid`), whole or a strip of one region: (picture, region index or None for whole)."""
    image, masks = data.render(character, data.other_layout(rng, avoid), rng)
    if rng.random() < WHOLE_P:
        return data.to_pil(image), None
    region = int(rng.integers(len(data.REGIONS)))
    return strip_of(image, masks, region, rng), region


@dataclass
class AdapterExample:
    """One stage-3 example: a target, another rendering of its character as the reference, the
    caption the adapter trains under and the teacher's caption (it also names what the reference shows)."""

    image: np.ndarray  # (H, W, 3) uint8, the target
    masks: np.ndarray  # (3, H, W) bool, the target's regions
    reference: Image.Image
    caption: str
    teacher_caption: str


def paired_captions(character: data.Character, layout: data.Layout, shown: Sequence[int],
                    rng: np.random.Generator) -> Tuple[str, str]:
    """(caption, teacher caption): the same words, except that the teacher names the colours of the
    regions the reference shows where the caption gives the bare noun (the eval prompts' form)."""
    order = [int(i) for i in rng.permutation(len(data.REGIONS))]
    named = [bool(rng.random() >= ADAPTER_OMIT_COLOUR) for _ in data.REGIONS]
    bare = rng.random() < 0.2
    background = layout.background if rng.random() < 0.85 else None
    size = layout.size if rng.random() < 0.5 else None
    position = layout.position if rng.random() < 0.5 else None

    def text(full: Sequence[bool]) -> str:
        phrases = [data.region_phrase(character, data.REGIONS[r]) if full[r] else data.REGIONS[r] for r in order]
        return " , ".join(phrases) if bare else data.prompt(phrases, background, size, position)

    return text(named), text([n or r in shown for r, n in enumerate(named)])


def adapter_example(seed: int) -> AdapterExample:
    """A stage-3 example, a function of the seed: the reference is ANOTHER rendering of the target's
    character, so the adapter learns who the character is rather than where its pixels are."""
    target = data.make_sample(seed)
    rng = np.random.default_rng([seed, 2])
    reference, region = reference_view(target.character, target.layout, rng)
    shown = range(len(data.REGIONS)) if region is None else (region,)
    caption, teacher = paired_captions(target.character, target.layout, shown, rng)
    return AdapterExample(target.image, target.masks, reference, caption, teacher)


# what a reference shows of its character: skin, jacket colour, trousers colour, striped or not
ATTRIBUTES = (("skin", tuple(data.SKIN_TONES)), ("jacket", tuple(data.GARMENT_COLOURS)),
              ("trousers", tuple(data.GARMENT_COLOURS)), ("striped", (False, True)))
VISIBLE = {None: (0, 1, 2, 3), 0: (0,), 1: (1, 3), 2: (2,)}  # attributes a whole picture / a region's strip shows


def pretrain_clip(clip, steps: int, batch_size: int, lr: float = 2e-3, pool: int = 4096):
    """Stage 2: the toy image encoder learns to see who a character is, as a real CLIP has before an
    IP-Adapter is trained on it: a linear read-out of its image embeds names the character's colours
    and stripes from another rendering, whole or a strip (only what the strip shows). No UNet.
    The views are drawn and preprocessed once (a pool of `pool`), then sampled: on a busy CPU the
    bicubic resize to 224 px costs as much as the encoder."""
    torch.manual_seed(SEED + 2)
    rng = np.random.default_rng(SEED + 2)
    pixels, labels, visible = [], [], []
    for _ in range(pool):
        character = data.sample_character(rng)
        picture, region = reference_view(character, None, rng)
        pixels.append(preprocess_images([picture])[0].to(torch.bfloat16))  # (3, 224, 224), halves the pool's memory
        labels.append([values.index(getattr(character, name)) for name, values in ATTRIBUTES])
        visible.append([float(a in VISIBLE[region]) for a in range(len(ATTRIBUTES))])
    pixels_all, labels_all, visible_all = torch.stack(pixels), torch.tensor(labels), torch.tensor(visible)
    head = torch.nn.Linear(clip.config.projection_dim, sum(len(v) for _, v in ATTRIBUTES))
    params = list(clip.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sizes = [len(v) for _, v in ATTRIBUTES]
    t0, running = time.time(), None
    clip.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 30, steps)
        pick = torch.from_numpy(rng.choice(pool, batch_size, replace=False))
        target, seen = labels_all[pick], visible_all[pick]  # (B, A), (B, A)
        logits = head(clip(pixel_values=pixels_all[pick].float()).image_embeds).split(sizes, dim=1)
        losses = torch.stack([F.cross_entropy(lg, target[:, a], reduction="none") for a, lg in enumerate(logits)], 1)
        loss = (losses * seen).sum() / seen.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        right = torch.stack([lg.argmax(dim=1) == target[:, a] for a, lg in enumerate(logits)], 1).float()
        accuracy = float((right * seen).sum() / seen.sum())
        running = (loss.item(), accuracy) if running is None else tuple(
            0.95 * r + 0.05 * v for r, v in zip(running, (loss.item(), accuracy)))
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {running[0]:.3f} attribute accuracy {running[1]:.3f} "
                f"({time.time() - t0:.0f} s)")
    return clip.eval().requires_grad_(False)


def adapter_state(clip, adapter: ToyAdapter, references: Sequence[Image.Image], keep: torch.Tensor) -> RegionState:
    """The hooks' state with one token set per batch row (one global region): the plain IP-Adapter."""
    embeds = clip(pixel_values=preprocess_images(list(references))).image_embeds * keep  # dropped: zeros
    tokens = adapter.image_proj(embeds)  # (B, T, C_ctx)
    kv = [(F.linear(tokens, k)[None], F.linear(tokens, v)[None])  # (1, B, T, C_inner): one region, a set per row
          for k, v in zip(adapter.to_k_ip, adapter.to_v_ip)]
    return RegionState(kv=kv, weights=torch.ones(1))


def adapter_eps(model, layers, state: Optional[RegionState], x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
    """One UNet call, with the adapter's hooks when a state is given."""
    unet = model.model.diffusion_model
    if state is None:
        return model.apply_model(x, t, cond)
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, layers, state)
    with session:
        return model.apply_model(x, t, cond)


PROBE_T = (300, 500, 700)


class GainProbe:
    """Teacher-forced gain of the plain adapter while it trains: held-out characters drawn at another
    layout than their reference, noised at PROBE_T, prompts that name no colour; 1 - the adapter's
    epsilon-MSE / the base's on each region; figure = the mean of face, jacket and trousers (as in
    toyworld.teacher), and the background."""

    def __init__(self, model, layers, refs: int = 16):
        self.model, self.layers = model, layers
        rng = np.random.default_rng(77)
        targets, references, prompts, colour_prompts, masks = [], [], [], [], []
        for sample in data.held_out(refs, offset=7000):
            layout = data.other_layout(rng, sample.layout)
            image, mask = data.render(sample.character, layout, rng)
            colours = [data.region_phrase(sample.character, r) for r in data.REGIONS]
            for _ in PROBE_T:
                targets.append(image)
                masks.append(mask)
                references.append(data.to_pil(sample.image))
                prompts.append(data.prompt(list(data.REGIONS), layout.background, layout.size, layout.position))
                colour_prompts.append(data.prompt(colours, layout.background, layout.size, layout.position))
        x0 = torch.from_numpy(data.to_x0(targets))  # (B, 3, H, W)
        self.t = torch.tensor(list(PROBE_T) * refs)
        gen = torch.Generator().manual_seed(78)
        self.noise = torch.randn(x0.shape, generator=gen)
        self.x = model.q_sample(x0, self.t, self.noise)
        self.references = references
        regions = np.stack(masks)  # (B, 3, H, W)
        self.regions = [torch.from_numpy(r) for r in regions.transpose(1, 0, 2, 3)]
        self.regions.append(torch.from_numpy(~regions.any(axis=1)))  # the background last
        with torch.no_grad():
            self.cond = model.get_learned_conditioning(prompts)
            self.base = self._errors(adapter_eps(model, layers, None, self.x, self.t.float(), self.cond))
            named = self._errors(adapter_eps(model, layers, None, self.x, self.t.float(),
                                             model.get_learned_conditioning(colour_prompts)))
        self.text = f"the colours in the prompt instead: figure {self._gains(named)[0]:+.3f}"

    def _errors(self, eps: torch.Tensor) -> np.ndarray:
        se = ((eps - self.noise) ** 2).mean(dim=1)  # (B, H, W)
        return np.array([float(se[m].mean()) for m in self.regions])

    def _gains(self, errors: np.ndarray) -> Tuple[float, float]:
        """(figure, background) gains against the base."""
        g = 1 - errors / self.base
        return float(g[:-1].mean()), float(g[-1])

    @torch.no_grad()
    def __call__(self, clip, adapter: ToyAdapter) -> str:
        state = adapter_state(clip, adapter, self.references, torch.ones(len(self.references), 1))
        figure, background = self._gains(self._errors(
            adapter_eps(self.model, self.layers, state, self.x, self.t.float(), self.cond)))
        return f"teacher-forced gain figure {figure:+.3f}, background {background:+.3f} ({self.text})"


T_LOW, T_HIGH = 50, 950  # stage 3's timesteps


@torch.no_grad()
def error_curve(model, layers, points: int = 10, size: int = 48) -> Tuple[np.ndarray, np.ndarray]:
    """(t, the base model's epsilon-MSE at t) on `size` stage-3 examples, at `points` timesteps."""
    examples = [adapter_example(60_000_000 + i) for i in range(size)]
    x0 = torch.from_numpy(data.to_x0([e.image for e in examples]))  # (B, 3, H, W)
    cond = model.get_learned_conditioning([e.caption for e in examples])
    gen = torch.Generator().manual_seed(SEED + 3)
    ts = np.linspace(T_LOW, T_HIGH - 1, points).round().astype(int)
    errors = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((size,), int(t))
        eps = adapter_eps(model, layers, None, model.q_sample(x0, tt, noise), tt.float(), cond)
        errors.append(float(((eps - noise) ** 2).mean()))
    return ts.astype(np.float64), np.array(errors)


DISTILL = 1.0  # weight of the teacher term


def region_balance(masks: np.ndarray) -> torch.Tensor:
    """(B, H, W) pixel weights from (B, 3, H, W) region masks: the figure keeps its area's share of
    the loss, split equally between face, jacket and trousers; the background keeps its own. By
    area the jacket rules the figure and the face, the smallest part, barely counts."""
    m = torch.from_numpy(masks).float()  # (B, 3, H, W)
    area = m.sum(dim=(2, 3), keepdim=True)  # (B, 3, 1, 1)
    figure = area.sum(dim=1, keepdim=True)
    per_region = m * figure / (len(data.REGIONS) * area.clamp(min=1))
    return per_region.sum(dim=1) + (1 - m.amax(dim=1))


def train_adapter(model, clip, steps: int, batch_size: int, out: str, lr: float = 1e-3, save_every: int = 100,
                  probe_every: int = 50, start_from: Optional[str] = None, first_example: int = 0):
    """Stage 3: base and image encoder frozen; projection + to_k_ip/to_v_ip trained, starting from
    the text attention's to_k/to_v (IP-Adapter's initialisation: image tokens are read like words).
    Two terms: the epsilon-MSE, and the distance to the base model's own prediction under the
    teacher caption, which names the colours the reference shows (the adapter learns first what
    the missing words would have said; the target noise alone is a much noisier signal of it).
    Timesteps T_LOW..T_HIGH, each example's terms divided by the base model's error at its t
    (error_curve): the plain epsilon-MSE is ruled by the small t, where the pixels already show
    the colours and a reference has least to add. `start_from`: an adapter file to go on from (a
    longer run in several sittings), with examples from `first_example` on (none seen twice)."""
    torch.manual_seed(SEED + 1)
    model.eval().requires_grad_(False)
    unet = model.model.diffusion_model
    layers = find_attn2_layers(unet)
    adapter = ToyAdapter([layer.inner_dim for layer in layers], seed=SEED,
                         text_kv=[(layer.module.to_k.weight, layer.module.to_v.weight) for layer in layers])
    if start_from:
        from safetensors.torch import load_file

        adapter.load_flat(load_file(start_from))
    params = list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED + 1)
    rng = np.random.default_rng(SEED + 1)
    curve_t, curve = error_curve(model, layers)
    log("base error by t: " + ", ".join(f"{t:.0f} {e:.4f}" for t, e in zip(curve_t, curve)))
    probe = GainProbe(model, layers) if probe_every else None
    if probe is not None:
        log(f"adapter step 0: {probe(clip, adapter)}")
    offset = 50_000_000 + first_example  # other images than stage 1's (same distribution)
    t0, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 20, steps)
        examples = [adapter_example(offset + step * batch_size + i) for i in range(batch_size)]
        x0 = torch.from_numpy(data.to_x0([e.image for e in examples]))  # (B, 3, H, W)
        drop_text = rng.random(batch_size) < 0.1
        captions = ["" if d else e.caption for d, e in zip(drop_text, examples)]
        teachers = ["" if d else e.teacher_caption for d, e in zip(drop_text, examples)]
        keep = torch.from_numpy((rng.random(batch_size) >= 0.1).astype(np.float32))[:, None]
        state = adapter_state(clip, adapter, [e.reference for e in examples], keep)
        t = torch.randint(T_LOW, T_HIGH, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x = model.q_sample(x0, t, noise)
        with torch.no_grad():
            cond = model.get_learned_conditioning(captions)
            taught = adapter_eps(model, layers, None, x, t, model.get_learned_conditioning(teachers))
        eps = adapter_eps(model, layers, state, x, t, cond)
        scale = torch.from_numpy(1.0 / np.interp(t.numpy(), curve_t, curve)).float()  # (B,)
        scale = scale * keep[:, 0] / float(np.mean(1.0 / curve))  # no reference: nothing to teach
        pixels = ((eps - noise) ** 2).mean(dim=1) + DISTILL * ((eps - taught) ** 2).mean(dim=1)  # (B, H, W)
        terms = (pixels * region_balance(np.stack([e.masks for e in examples]))).mean(dim=(1, 2))
        loss = (terms * scale).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"adapter step {step}/{steps} loss {running:.4f} ({time.time() - t0:.0f} s)")
        if probe is not None and ((step + 1) % probe_every == 0 or step == steps - 1):
            log(f"adapter step {step + 1}: {probe(clip, adapter)}")
        if (step + 1) % save_every == 0 or step == steps - 1:
            save_image_side(clip, adapter, out)
    return adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=24, help="batch of the base model's stage")
    parser.add_argument("--clip-steps", type=int, default=1600)
    parser.add_argument("--clip-batch", type=int, default=64)
    parser.add_argument("--adapter-steps", type=int, default=2000)
    parser.add_argument("--adapter-batch", type=int, default=16)
    parser.add_argument("--adapter-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=WEIGHTS)
    parser.add_argument("--skip-base", action="store_true",
                        help="reuse the saved base model; train the image side (encoder and adapter) only")
    parser.add_argument("--skip-clip", action="store_true",
                        help="also reuse the saved image encoder; train the adapter only (with --skip-base)")
    parser.add_argument("--adapter-from", help="an adapter file to go on training from (with --skip-clip)")
    parser.add_argument("--first-example", type=int, default=0,
                        help="index of stage 3's first example (going on: the steps x batch already seen)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.skip_base:
        from .model import load_sd

        model = load_sd(args.out)
    else:
        model = train_base(args.base_steps, args.batch, args.out)
    log(f"base done in {time.time() - start:.0f} s")
    if args.skip_clip:
        from charadapter.clip_vision import load_clip_vision

        clip = load_clip_vision(os.path.join(args.out, CLIP_DIR)).requires_grad_(False)
    else:
        clip = pretrain_clip(build_clip(SEED), args.clip_steps, args.clip_batch)
        clip.half().float()  # the weights the fp16 file holds: stage 3 sees the same encoder with --skip-clip
    log(f"image encoder done in {time.time() - start:.0f} s")
    train_adapter(model, clip, args.adapter_steps, args.adapter_batch, args.out, lr=args.adapter_lr,
                  start_from=args.adapter_from, first_example=args.first_example)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    log(f"all done in {time.time() - start:.0f} s; {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
