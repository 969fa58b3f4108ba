"""Train the toy world's models from scratch, with a fixed seed: `python -m toyworld.train`.

Stage 1, the text-to-image model: epsilon-prediction on synthetic characters and captions, text
encoder trained jointly, 10 % caption dropout, AdamW + warm-up, EMA weights saved.
Stage 2, the IP-Adapter the IP-Adapter way: the stage-1 model frozen, the reference is the
target image itself (or, half of the time, a full-width strip of it padded to a square, the
crop Character-Adapter feeds a region), 10 % image dropout to the negative tokens, 10 % text
dropout. The toy CLIP image encoder has no pretraining, so it is trained with the adapter.
The image term goes through the extension's own hooks (charadapter.hooks), so training and
inference add it with the same code.

Every 150 base steps the segmentation IoU of the EMA model on 24 held-out references is logged:
the loss says little about whether the text maps localise yet.

Two threads (this machine's cores) by default; on a shared, busy machine `--threads 1` was faster.
"""

import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from charadapter.clip_vision import preprocess_images
from charadapter.hooks import HookSession, RegionState, plan_region_hooks
from charadapter.images import GREY, pad_to_square
from charadapter.layers import find_attn2_layers

from . import data
from .model import WEIGHTS, ToyAdapter, build_clip, build_sd, save_image_side, save_sd

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
    from .evaluate import TextWorld, segmentation_iou

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


def strip_of(sample: data.Sample, rng: np.random.Generator) -> Image.Image:
    """A full-width band around one region's rows (jittered), padded to a square: the kind of crop
    Character-Adapter feeds the adapter for a region."""
    region = sample.masks[rng.integers(len(data.REGIONS))]
    rows = np.flatnonzero(region.any(axis=1))
    top = max(0, int(rows[0]) - int(rng.integers(0, 3)))
    bottom = min(data.SIZE, int(rows[-1]) + 1 + int(rng.integers(0, 3)))
    return pad_to_square(data.to_pil(sample.image).crop((0, top, data.SIZE, bottom)), GREY)


def train_adapter(model, steps: int, batch_size: int, out: str, save_every: int = 200):
    """Stage 2: base frozen; CLIP + projection + to_k_ip/to_v_ip trained."""
    torch.manual_seed(SEED + 1)
    model.eval().requires_grad_(False)
    unet = model.model.diffusion_model
    layers = find_attn2_layers(unet)
    clip = build_clip(SEED).train()
    adapter = ToyAdapter([layer.inner_dim for layer in layers], seed=SEED)
    params = list(clip.parameters()) + list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED + 1)
    rng = np.random.default_rng(SEED + 1)
    offset = 50_000_000  # other images than stage 1's (same distribution)
    t0, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-3, 50, steps)
        images, captions, samples = data.batch(range(offset + step * batch_size, offset + (step + 1) * batch_size))
        refs = [data.to_pil(s.image) if rng.random() < 0.5 else strip_of(s, rng) for s in samples]
        captions = [c if rng.random() >= 0.1 else "" for c in captions]
        keep_image = torch.from_numpy((rng.random(batch_size) >= 0.1).astype(np.float32))[:, None]
        embeds = clip(pixel_values=preprocess_images(refs)).image_embeds * keep_image  # dropped: zeros
        tokens = adapter.image_proj(embeds)  # (B, T, C_ctx)
        kv = [(F.linear(tokens, k)[None], F.linear(tokens, v)[None])  # (1, B, T, C_inner): one region, a set per row
              for k, v in zip(adapter.to_k_ip, adapter.to_v_ip)]
        state = RegionState(kv=kv, weights=torch.ones(1))
        session = HookSession(root=unet)
        plan_region_hooks(session, unet, layers, state)
        x0 = torch.from_numpy(images)
        t = torch.randint(0, model.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            cond = model.get_learned_conditioning(captions)
        with session:
            eps = model.apply_model(model.q_sample(x0, t, noise), t, cond)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"adapter step {step}/{steps} loss {running:.4f} ({time.time() - t0:.0f} s)")
        if (step + 1) % save_every == 0 or step == steps - 1:
            save_image_side(clip.eval(), adapter, out)
            clip.train()
    return clip.eval(), adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=1700)
    parser.add_argument("--adapter-steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=WEIGHTS)
    parser.add_argument("--skip-base", action="store_true", help="reuse the saved base model; train the adapter only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.skip_base:
        from .model import load_sd

        model = load_sd(args.out)
    else:
        model = train_base(args.base_steps, args.batch, args.out)
    log(f"base done in {time.time() - start:.0f} s")
    train_adapter(model, args.adapter_steps, args.batch, args.out)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    log(f"all done in {time.time() - start:.0f} s; {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
