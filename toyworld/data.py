"""Synthetic characters with known region masks: face, jacket (upper body), trousers (lower body).

Everything is a pure function of a seed (numpy Generator), so a held-out set is the same on every
machine. Images are SIZE x SIZE RGB uint8; masks are (3, SIZE, SIZE) bool in REGIONS order.

Designed around the colour confound of the feasibility run (the text maps followed colour words,
not garment nouns): garments differ in shape (jacket = torso + sleeves with a dark centre zip,
trousers = two legs with a gap) and sometimes in texture (striped jackets); captions sometimes
omit a colour or give jacket and trousers the same one, so a map can only be right by its noun.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4  # draw at 4x, box-filter down: anti-aliased edges, masks by majority
REGIONS = ("face", "jacket", "trousers")
GARMENT_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (235, 205, 40),
    "green": (40, 170, 60), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SKIN_TONES: Dict[str, Tuple[int, int, int]] = {"pale": (250, 220, 190), "tan": (205, 150, 100), "dark": (115, 75, 45)}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (235, 235, 235), "black": (25, 25, 25), "pink": (240, 165, 190), "cyan": (130, 215, 225),
}
POSES = ("stand", "walk", "squat")
POSITIONS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
SIZES = ("small", "big")
STRIPE_SHADE = 0.5  # stripes are the jacket colour times this


@dataclass(frozen=True)
class Character:
    """Who it is: what a reference must transfer."""

    skin: str
    jacket: str
    trousers: str
    striped: bool = False

    def colour(self, region: str) -> Tuple[int, int, int]:
        """The nominal RGB of a region (a striped jacket: its main colour)."""
        if region == "face":
            return SKIN_TONES[self.skin]
        return GARMENT_COLOURS[self.jacket if region == "jacket" else self.trousers]


@dataclass(frozen=True)
class Layout:
    """Where and how it stands: what a new prompt may change."""

    background: str
    cx: float  # figure centre x, fraction of the image width
    bottom: float  # feet y, fraction of the image height
    height: float  # figure height (standing), fraction of the image height
    pose: str = "stand"

    @property
    def position(self) -> str:
        return "left" if self.cx < 0.4 else "right" if self.cx > 0.6 else "middle"

    @property
    def size(self) -> str:
        return "small" if self.height < 0.72 else "big"


@dataclass
class Sample:
    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    masks: np.ndarray  # (3, SIZE, SIZE) bool, REGIONS order, disjoint
    character: Character
    layout: Layout
    caption: str


# --------------------------------------------------------------------------- sampling


def sample_character(rng: np.random.Generator, same_colour_p: float = 0.15, striped_p: float = 0.3) -> Character:
    """A random character; jacket and trousers share a colour with probability same_colour_p."""
    colours = list(GARMENT_COLOURS)
    jacket = colours[rng.integers(len(colours))]
    if rng.random() < same_colour_p:
        trousers = jacket
    else:
        trousers = [c for c in colours if c != jacket][rng.integers(len(colours) - 1)]
    skin = list(SKIN_TONES)[rng.integers(len(SKIN_TONES))]
    return Character(skin, jacket, trousers, bool(rng.random() < striped_p))


def layout_for(rng: np.random.Generator, background: str, position: str, size: str, pose: str = "stand") -> Layout:
    """A random layout that fits the named position and size (for prompts that ask for them)."""
    height = rng.uniform(0.55, 0.7) if size == "small" else rng.uniform(0.76, 0.92)
    half_width = 0.5 * 0.62 * height  # widest part (sleeves), fraction of the image
    lo, hi = {"left": (0.0, 0.36), "middle": (0.44, 0.56), "right": (0.64, 1.0)}[position]
    lo, hi = max(lo, half_width), min(hi, 1.0 - half_width)
    cx = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
    bottom = rng.uniform(min(0.98, height + 0.02), 0.99)
    return Layout(background, float(cx), float(bottom), float(height), pose)


def sample_layout(rng: np.random.Generator) -> Layout:
    """A random layout: background, position, size, pose."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    size = SIZES[rng.integers(len(SIZES))]
    pose = POSES[rng.choice(len(POSES), p=[0.6, 0.25, 0.15])]
    return layout_for(rng, background, position, size, pose)


# --------------------------------------------------------------------------- drawing


def _jitter(rng: Optional[np.random.Generator], rgb: Tuple[int, int, int], amount: float = 0.05) -> Tuple[int, ...]:
    if rng is None:
        return tuple(rgb)
    return tuple(int(np.clip(c + rng.uniform(-amount, amount) * 255, 0, 255)) for c in rgb)


def _shade(rgb: Sequence[int], factor: float) -> Tuple[int, ...]:
    return tuple(int(c * factor) for c in rgb)


def _draw_figure(draw: ImageDraw.ImageDraw, mark: ImageDraw.ImageDraw, character: Character, layout: Layout,
                 rng: Optional[np.random.Generator], first_label: int) -> None:
    """Draw one figure on a supersampled canvas; its regions get labels first_label + 0/1/2."""
    S = SIZE * SUPERSAMPLE
    H = layout.height * S
    cx, bottom = layout.cx * S, layout.bottom * S
    squat = layout.pose == "squat"
    leg = 0.36 * H * (0.6 if squat else 1.0)
    top = bottom - leg - 0.36 * H - 0.30 * H  # legs, torso, head from the feet up
    head_h, torso_h = 0.30 * H, 0.36 * H
    head_w, torso_w, sleeve_w = 0.34 * H, 0.36 * H, 0.62 * H
    skin = _jitter(rng, SKIN_TONES[character.skin])
    jacket = _jitter(rng, GARMENT_COLOURS[character.jacket])
    trousers = _jitter(rng, GARMENT_COLOURS[character.trousers])
    face_label, jacket_label, trousers_label = first_label, first_label + 1, first_label + 2

    def poly(points, colour, label):
        draw.polygon(points, fill=colour)
        mark.polygon(points, fill=label)

    # trousers: two legs with a gap; walking spreads them, squatting makes them short and wide
    hip = top + head_h + torso_h
    spread = {"stand": 0.0, "walk": 0.14 * H, "squat": 0.12 * H}[layout.pose]
    half, gap = 0.5 * torso_w, 0.05 * H
    waist = hip + 0.12 * H
    poly([(cx - half, hip), (cx + half, hip), (cx + half, waist), (cx - half, waist)], trousers, trousers_label)
    for side in (-1, 1):
        inner, outer = cx + side * gap, cx + side * half
        foot_in, foot_out = inner + side * spread, outer + side * spread
        poly([(inner, waist - 1), (outer, waist - 1), (foot_out, bottom), (foot_in, bottom)], trousers, trousers_label)
    # jacket: torso plus sleeves (a T), a dark zip down the centre, optional horizontal stripes
    torso = [(cx - half, top + head_h), (cx + half, top + head_h), (cx + half, hip), (cx - half, hip)]
    poly(torso, jacket, jacket_label)
    sleeve_h = 0.5 * torso_h
    for side in (-1, 1):
        a, b = cx + side * half, cx + side * 0.5 * sleeve_w
        shoulder = top + head_h + 0.03 * H
        poly([(a, shoulder), (b, shoulder + 0.1 * H), (b, shoulder + sleeve_h + 0.1 * H), (a, shoulder + sleeve_h)],
             jacket, jacket_label)
    if character.striped:
        dark = _shade(jacket, STRIPE_SHADE)
        y = top + head_h + SUPERSAMPLE
        while y < hip - SUPERSAMPLE:
            draw.rectangle((cx - half, y, cx + half, y + SUPERSAMPLE - 1), fill=dark)
            y += 2 * SUPERSAMPLE
    zip_w = max(1, SUPERSAMPLE // 2)
    draw.rectangle((cx - zip_w, top + head_h, cx + zip_w - 1, hip), fill=_shade(jacket, 0.35))
    # face: an ellipse on top, overlapping the collar
    face_box = (cx - 0.5 * head_w, top, cx + 0.5 * head_w, top + head_h + 0.02 * H)
    draw.ellipse(face_box, fill=skin)
    mark.ellipse(face_box, fill=face_label)


def render_scene(figures: Sequence[Tuple[Character, Layout]], background: str,
                 rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Image (SIZE, SIZE, 3) uint8 and masks (F, 3, SIZE, SIZE) bool of F figures drawn in order
    (a later figure hides an earlier one) on one background; rng adds colour jitter."""
    S = SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (S, S), _jitter(rng, BACKGROUNDS[background]))
    labels = Image.new("L", (S, S), 0)  # 0 background, then 3 labels per figure: face, jacket, trousers
    draw, mark = ImageDraw.Draw(canvas), ImageDraw.Draw(labels)
    for f, (character, layout) in enumerate(figures):
        _draw_figure(draw, mark, character, layout, rng, 1 + len(REGIONS) * f)
    image = np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)
    count = len(REGIONS) * len(figures)
    lab = np.asarray(labels, dtype=np.uint8).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE)
    counts = np.stack([(lab == k + 1).sum(axis=(1, 3)) for k in range(count)])  # (F*3, SIZE, SIZE)
    majority = counts.argmax(axis=0)
    inside = counts.max(axis=0) * 2 >= SUPERSAMPLE * SUPERSAMPLE
    masks = np.stack([(majority == k) & inside for k in range(count)])  # (F*3, SIZE, SIZE)
    return image, masks.reshape(len(figures), len(REGIONS), SIZE, SIZE)  # (F, 3, SIZE, SIZE)


def render(character: Character, layout: Layout, rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Image (SIZE, SIZE, 3) uint8 and masks (3, SIZE, SIZE) bool of one figure; rng adds colour jitter."""
    image, masks = render_scene([(character, layout)], layout.background, rng)
    return image, masks[0]


def other_layout(rng: np.random.Generator, avoid: Optional[Layout] = None, pose: str = "stand") -> Layout:
    """A random layout with another background than `avoid`'s (position and size random)."""
    backgrounds = [b for b in BACKGROUNDS if avoid is None or b != avoid.background]
    background = backgrounds[rng.integers(len(backgrounds))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    return layout_for(rng, background, position, SIZES[rng.integers(len(SIZES))], pose)


def with_other(character: Character, region: str, rng: np.random.Generator) -> Character:
    """The same character with exactly one region changed: another skin tone, or another garment
    colour that differs from the other garment's too (so the phrases still tell them apart)."""
    if region == "face":
        skins = [k for k in SKIN_TONES if k != character.skin]
        return replace(character, skin=skins[rng.integers(len(skins))])
    taken = {character.jacket, character.trousers}
    colours = [c for c in GARMENT_COLOURS if c not in taken]
    colour = colours[rng.integers(len(colours))]
    return replace(character, **{region: colour})


# --------------------------------------------------------------------------- captions


def region_phrase(character: Character, region: str, with_colour: bool = True) -> str:
    """'pale face', 'red striped jacket', 'blue trousers' (or the bare noun)."""
    if region == "face":
        return f"{character.skin} face" if with_colour else "face"
    pattern = "striped " if region == "jacket" and character.striped else ""
    colour = (character.jacket if region == "jacket" else character.trousers) + " " if with_colour else ""
    return f"{colour}{pattern}{region}"


def prompt(phrases: Sequence[str], background: Optional[str] = None, size: Optional[str] = None,
           position: Optional[str] = None) -> str:
    """'a [size] figure [position] with a P1 , a P2 and P3 [in a BG room]'."""
    head = "a" + (f" {size}" if size else "") + " figure" + (f" {POSITIONS[position]}" if position else "")
    body = " , ".join(f"a {p}" for p in phrases[:-1]) + f" and {phrases[-1]}" if len(phrases) > 1 else f"a {phrases[0]}"
    tail = f" in a {background} room" if background else ""
    return f"{head} with {body}{tail}"


def caption(character: Character, layout: Layout, rng: np.random.Generator, omit_colour_p: float = 0.25,
            bare_p: float = 0.2) -> str:
    """A training caption: colours sometimes omitted, order shuffled, layout words sometimes;
    with probability bare_p just the region phrases comma-separated (the segmentation prompt's form)."""
    order = [REGIONS[i] for i in rng.permutation(len(REGIONS))]
    phrases = [region_phrase(character, r, rng.random() >= omit_colour_p) for r in order]
    if rng.random() < bare_p:
        return " , ".join(phrases)
    return prompt(
        phrases,
        background=layout.background if rng.random() < 0.85 else None,
        size=layout.size if rng.random() < 0.5 else None,
        position=layout.position if rng.random() < 0.5 else None,
    )


def vocabulary() -> List[str]:
    """Every word a caption or evaluation prompt can contain."""
    words = ["a", "figure", "with", "and", "in", "room", ",", "on", "the", "striped"]
    words += list(REGIONS) + list(GARMENT_COLOURS) + list(SKIN_TONES) + list(BACKGROUNDS) + list(SIZES)
    words += [w for phrase in POSITIONS.values() for w in phrase.split()]
    return sorted(set(words))


# --------------------------------------------------------------------------- sets


def make_sample(seed: int) -> Sample:
    """One training/evaluation sample, a pure function of its seed."""
    rng = np.random.default_rng(seed)
    character = sample_character(rng)
    layout = sample_layout(rng)
    image, masks = render(character, layout, rng)
    return Sample(image, masks, character, layout, caption(character, layout, rng))


def to_x0(images: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 pictures as the model's x0: (B, 3, H, W) float32 in [-1, 1]."""
    return np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def batch(seeds: Sequence[int]) -> Tuple[np.ndarray, List[str], List[Sample]]:
    """Images (B, 3, SIZE, SIZE) float32 in [-1, 1], captions and the samples."""
    samples = [make_sample(int(s)) for s in seeds]
    return to_x0([s.image for s in samples]), [s.caption for s in samples], samples


HELD_OUT_BASE = 10_000_000  # evaluation seeds start here; training seeds stay below


def held_out(n: int, offset: int = 0) -> List[Sample]:
    """The evaluation references: standing figures (a reference shows the whole character)."""
    out = []
    seed = HELD_OUT_BASE + offset
    while len(out) < n:
        rng = np.random.default_rng(seed)
        character = sample_character(rng)
        layout = replace(sample_layout(rng), pose="stand")
        image, masks = render(character, layout, rng)
        out.append(Sample(image, masks, character, layout, caption(character, layout, rng)))
        seed += 1
    return out


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.uint8))
