"""Templated clip-art for the demo crawl: the images a real crawl is full of and perceptual hashes confuse.

Each function draws one *distinct* image with PIL; images of one family share a template and differ in small but
meaningful ways, so they are not duplicates of each other:

- playing cards: the same layout for every card; same-rank cards differ only in the suit's shape and colour;
- flags: tricolours and Nordic crosses that differ only in their colours;
- recoloured drawings: one random drawing in several colour schemes;
- captioned images: different pictures under one shared caption band, as stock and clip-art sites stamp them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
SUITS = ("spades", "hearts", "diamonds", "clubs")
PALETTE = {"red": (206, 17, 38), "white": (255, 255, 255), "blue": (0, 56, 168), "green": (0, 135, 81),
           "yellow": (252, 209, 22), "black": (20, 20, 20), "orange": (255, 130, 0), "sky": (90, 170, 230),
           "maroon": (128, 20, 40)}
CAPTION = "www.free-clipart.example"
# Pip positions (fractions of the card) of the number cards, as printed cards lay them out.
_PIPS = {1: [(0.5, 0.5)], 2: [(0.5, 0.25), (0.5, 0.75)], 3: [(0.5, 0.22), (0.5, 0.5), (0.5, 0.78)]}
_PIPS[4] = [(x, y) for x in (0.32, 0.68) for y in (0.25, 0.75)]
_PIPS[5] = _PIPS[4] + [(0.5, 0.5)]
_PIPS[6] = [(x, y) for x in (0.32, 0.68) for y in (0.22, 0.5, 0.78)]
_PIPS[7] = _PIPS[6] + [(0.5, 0.36)]
_PIPS[8] = _PIPS[7] + [(0.5, 0.64)]
_PIPS[9] = [(x, y) for x in (0.32, 0.68) for y in (0.2, 0.4, 0.6, 0.8)] + [(0.5, 0.5)]
_PIPS[10] = [(x, y) for x in (0.32, 0.68) for y in (0.2, 0.4, 0.6, 0.8)] + [(0.5, 0.3), (0.5, 0.7)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _suit(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, suit: str) -> None:
    """One suit symbol of radius ~r centred at (cx, cy)."""
    colour = (200, 20, 30) if suit in ("hearts", "diamonds") else (15, 15, 15)
    if suit == "diamonds":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=colour)
        return
    if suit == "clubs":
        for dx, dy in ((0, -0.45), (-0.45, 0.1), (0.45, 0.1)):
            draw.ellipse((cx + dx * r - 0.42 * r, cy + dy * r - 0.42 * r, cx + dx * r + 0.42 * r,
                          cy + dy * r + 0.42 * r), fill=colour)
        draw.polygon([(cx, cy), (cx - 0.3 * r, cy + r), (cx + 0.3 * r, cy + r)], fill=colour)
        return
    flip = -1 if suit == "spades" else 1  # a spade is an upside-down heart on a stem
    for dx in (-0.45, 0.45):
        top = cy - flip * 0.3 * r
        draw.ellipse((cx + dx * r - 0.5 * r, top - 0.5 * r, cx + dx * r + 0.5 * r, top + 0.5 * r), fill=colour)
    draw.polygon([(cx - 0.95 * r, cy - flip * 0.15 * r), (cx + 0.95 * r, cy - flip * 0.15 * r),
                  (cx, cy + flip * r)], fill=colour)
    if suit == "spades":
        draw.polygon([(cx, cy), (cx - 0.3 * r, cy + r), (cx + 0.3 * r, cy + r)], fill=colour)


def playing_card(rank: str, suit: str, side: int = 128) -> Image.Image:
    """A card face: white card on a green table, rank in two corners, pips (or a framed letter for J, Q, K)."""
    w, h = int(side * 0.72), side
    image = Image.new("RGB", (w, h), (30, 110, 50))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((2, 2, w - 3, h - 3), radius=side // 14, fill=(250, 250, 245), outline=(60, 60, 60))
    colour = (200, 20, 30) if suit in ("hearts", "diamonds") else (15, 15, 15)
    font = _font(side // 9)
    draw.text((6, 4), rank, fill=colour, font=font)
    draw.text((w - 7, h - 5), rank, fill=colour, font=font, anchor="rd")
    _suit(draw, 10 + side // 40, side // 9 + 10, side // 28, suit)
    if rank in ("J", "Q", "K"):
        draw.rectangle((w * 0.22, h * 0.2, w * 0.78, h * 0.8), outline=colour, width=2)
        draw.text((w / 2, h / 2), rank, fill=colour, font=_font(side // 3), anchor="mm")
        return image
    for fx, fy in _PIPS[1 if rank == "A" else int(rank)]:
        _suit(draw, w * fx, h * fy, side * (0.13 if rank == "A" else 0.06), suit)
    return image


def flag(kind: str, colours: tuple[str, ...], side: int = 120) -> Image.Image:
    """A flag: `vertical` / `horizontal` tricolour or a Nordic `cross` (colours: background, cross)."""
    w, h = side, int(side * 2 / 3)
    image = Image.new("RGB", (w, h), PALETTE[colours[0]])
    draw = ImageDraw.Draw(image)
    if kind == "vertical":
        for k, c in enumerate(colours):
            draw.rectangle((k * w / 3, 0, (k + 1) * w / 3, h), fill=PALETTE[c])
    elif kind == "horizontal":
        for k, c in enumerate(colours):
            draw.rectangle((0, k * h / 3, w, (k + 1) * h / 3), fill=PALETTE[c])
    else:
        bar = h / 5
        draw.rectangle((w * 0.3, 0, w * 0.3 + bar, h), fill=PALETTE[colours[1]])
        draw.rectangle((0, h / 2 - bar / 2, w, h / 2 + bar / 2), fill=PALETTE[colours[1]])
    return image


def flag_designs(rng: np.random.Generator, n: int) -> list[tuple[str, tuple[str, ...]]]:
    """`n` distinct flag designs (kind, colours), no colour repeated next to itself."""
    names = sorted(PALETTE)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while len(seen) < n:
        kind = ("vertical", "horizontal", "cross")[int(rng.integers(0, 3))]
        picks = tuple(str(c) for c in rng.choice(names, size=2 if kind == "cross" else 3, replace=False))
        seen.add((kind, picks))
    return sorted(seen)


def drawing_shapes(rng: np.random.Generator, n_shapes: int = 7) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """A random clip-art drawing as (shape, box in a 100x100 frame, colour slot) for `recoloured`."""
    shapes = []
    for k in range(n_shapes):
        x0, y0 = (int(v) for v in rng.integers(0, 70, 2))
        x1, y1 = x0 + int(rng.integers(15, 45)), y0 + int(rng.integers(15, 45))
        shapes.append((("ellipse", "rectangle")[int(rng.integers(0, 2))], (x0, y0, x1, y1), k % 3))
    return shapes


def recoloured(shapes: list[tuple[str, tuple[int, int, int, int], int]], scheme: tuple[str, ...],
               side: int = 120) -> Image.Image:
    """The drawing `shapes` on a white page, its three colour slots filled with the colours of `scheme`."""
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for shape, box, slot in shapes:
        scaled = tuple(v * side / 100 for v in box)
        getattr(draw, shape)(scaled, fill=PALETTE[scheme[slot]], outline=(0, 0, 0))
    return image


def with_caption(image: Image.Image, caption: str = CAPTION) -> Image.Image:
    """`image` with a shared caption band over its lower third (white band, black text)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    top = int(out.height * 0.66)
    draw.rectangle((0, top, out.width, out.height), fill=(255, 255, 255))
    draw.text((out.width / 2, (top + out.height) / 2), caption, fill=(0, 0, 0), font=_font(max(8, out.width // 14)),
              anchor="mm")
    return out
