"""See Character-Adapter work without the WebUI: `python -m toyworld.demo` writes one picture sheet.

With the shipped toy weights (toyworld/weights), on the CPU in well under 2 minutes: a held-out
reference with the region masks its segmentation found and the strip crops the adapter encodes;
the layout that dynamic fusion computes from the generated image's own text attention as the
steps go; and the images of one prompt and one noise with no adapter, a plain IP-Adapter (one
global region), and Character-Adapter hard and soft. Everything runs through the extension's own
code (segment_reference, region_crops, RegionEncoder, FusionSession); README "Toy world" says
what the measurements found.
"""

import argparse
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

from charadapter.fusion import FusionConfig, FusionSession
from charadapter.overlays import PALETTE
from charadapter.segmentation import region_crops

from . import data
from .evaluate import sample_images
from .model import ROOT, WEIGHTS
from .teacher import SEG_T, references, targets_for
from .world import World

OUT = os.path.join(ROOT, "toyworld", "demo.png")
SCALE = 5  # 32 px cells drawn at 160 px
CELL = data.SIZE * SCALE
PAD, LABEL = 8, 34  # gap between cells, label band above a cell
BACKGROUND_RGB = (60, 60, 60)  # the layout's background channel
SETTINGS = (  # (label, FusionConfig arguments or None for no adapter)
    ("no adapter", None),
    ("IP-Adapter (global)", dict(region_weights=())),
    ("CA hard", dict(region_weights=(1.0, 1.0, 1.0), mode="hard")),
    ("CA soft", dict(region_weights=(1.0, 1.0, 1.0), mode="soft")),
)


def font(size: int):
    """A scalable font where Pillow has one (>= 10.1), else its bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def big(image) -> Image.Image:
    """A 32 px picture (array or PIL) at cell size, pixels kept sharp."""
    pil = image if isinstance(image, Image.Image) else data.to_pil(image)
    return pil.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def layout_picture(layout: Optional[torch.Tensor], regions: int) -> Image.Image:
    """A layout (R+1, N), background first, as colours: each region's segmentation colour weighted by
    its mask (None: the even-split prior of the first step)."""
    n = data.SIZE * data.SIZE
    if layout is None:
        layout = torch.cat([torch.zeros(1, n), torch.full((regions, n), 1.0 / regions)])
    colours = torch.tensor([BACKGROUND_RGB] + [PALETTE[r] for r in range(regions)], dtype=torch.float32)  # (R+1, 3)
    rgb = (layout.float().t() @ colours).reshape(data.SIZE, data.SIZE, 3)  # (N, R+1) @ (R+1, 3)
    return big(rgb.clamp(0, 255).round().byte().numpy())


def sheet(rows: Sequence[Tuple[str, Sequence[Tuple[str, Image.Image]]]], title: str) -> Image.Image:
    """Rows of labelled cells under a title."""
    title_font, row_font, cell_font = font(20), font(17), font(15)
    width = PAD + max(len(cells) for _, cells in rows) * (CELL + PAD)
    height = 40 + sum(28 + LABEL + CELL + PAD for _ in rows)
    out = Image.new("RGB", (max(width, 900), height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((PAD, 10), title, fill=(0, 0, 0), font=title_font)
    y = 40
    for heading, cells in rows:
        draw.text((PAD, y + 4), heading, fill=(30, 30, 120), font=row_font)
        y += 28
        for i, (label, picture) in enumerate(cells):
            x = PAD + i * (CELL + PAD)
            lines = label.split("\n")
            for j, line in enumerate(lines[:2]):
                draw.text((x, y + j * 16), line, fill=(0, 0, 0), font=cell_font)
            out.paste(picture, (x, y + LABEL))
        y += LABEL + CELL + PAD
    return out


def run(out: str = OUT, ref: int = 3, steps: int = 30, scale: float = 3.0, seed: int = 0, weights: str = WEIGHTS,
        layout_steps: Sequence[int] = (0, 1, 2, 4, 8, 16, 29), colours: bool = False) -> str:
    world = World(weights)
    reference = references(ref + 1)[ref]
    target = targets_for(reference, 1)[0]
    phrases = reference.phrases()
    seg = world.segment(reference.image, phrases, SEG_T)
    image = data.to_pil(reference.image)
    boxes = seg.boxes(image.size, "strip")
    crops = region_crops(image, boxes)
    whole, regional = world.encoder.encode([image]), world.encoder.encode(crops)
    prompt = target.colour_prompt if colours else target.prompt
    groups, bank = world.located(prompt, phrases)  # generation phrases = reference phrases (the runtime's default)
    noise = torch.randn((1, 3, data.SIZE, data.SIZE), generator=torch.Generator().manual_seed(seed))
    generated: List[Tuple[str, Image.Image]] = []
    layouts: List[Optional[torch.Tensor]] = []
    for label, kwargs in SETTINGS:
        if kwargs is None:
            img = sample_images(world, [prompt], noise, steps, scale, seed=seed)[0]
        else:
            tokens = whole if not kwargs["region_weights"] else regional
            config = FusionConfig(weight=1.0, map_levels=world.map_levels, **kwargs)
            record = layouts if label == "CA soft" else None
            with FusionSession(world.unet, world.layers, world.ip, tokens.cond, tokens.negative, config,
                               phrase_bank=None if bank is None else bank.embeddings) as fusion:
                img = sample_images(world, [prompt], noise, steps, scale, fusion, groups, seed=seed, layouts=record)[0]
        generated.append((label, big(img)))
    regions = len(data.REGIONS)
    legend = ", ".join(f"{r} = {name}" for r, name in zip(data.REGIONS, ("red", "green", "blue")))
    rows = [
        ("Reference (held out) and what the extension takes from it", [
            ("reference", big(reference.image)),
            (f"segmentation, T={SEG_T}\n{legend}", big(seg.to_overlay(image, alpha=0.6))),
        ] + [(f"{r} strip crop", big(c.resize((data.SIZE, data.SIZE)))) for r, c in zip(data.REGIONS, crops)] + [
            ("the same character in\nthe prompt's layout (truth)", big(target.image)),
        ]),
        ("Layout of CA soft over the steps (red face, green jacket, blue trousers, grey background)", [
            (f"step {s + 1}/{steps}" + ("\neven-split prior" if layouts[s] is None else ""),
             layout_picture(None if layouts[s] is None else layouts[s][0], regions))
            for s in layout_steps if s < len(layouts)
        ]),
        (f"Generated, same prompt and noise ({steps} ancestral DDIM steps, CFG {scale:g}, weight 1)", generated),
    ]
    title = f'Toy world: prompt "{prompt}"'
    picture = sheet(rows, title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    picture.save(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="where the PNG goes")
    parser.add_argument("--ref", type=int, default=3, help="which held-out reference (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colours", action="store_true", help="name the colours in the prompt")
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    path = run(args.out, args.ref, args.steps, seed=args.seed, weights=args.weights, colours=args.colours)
    print(f"wrote {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
