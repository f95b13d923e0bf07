"""Does a clip show what its prompt says? Measured on the pixels, with no learned judge.

Objects are found by colour: a pixel belongs to a palette colour when it lies within
`COLOUR_RADIUS` of it (backgrounds are far darker than any palette colour); a 3x3 opening
drops stray pixels, and a colour counts as an object when a compact blob of it is visible in
most frames (the opening would also cut a triangle's apex, so pixels next to what survives
it are put back). Then each prompt object is matched to a found one and judged on
- colour: the matched blob has the prompted colour;
- shape: the blob's median fill of its bounding box is nearest the shape's
  (triangle 1/2, circle pi/4, square 1);
- direction: the centroid's fitted velocity over the first half of the clip (before any
  bounce, see data.py) points nearest the prompted of the eight directions;
and the clip as a whole on
- count: as many objects as the prompt names;
- smooth: no frame differs from the next by more than a moving object can make it, and no
  centroid jumps further than the fastest object moves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import COLOURS, DIRECTIONS, FRAMES, PALETTE, SPEED, Prompt

COLOUR_RADIUS = 0.8  # palette colours are >= 2 apart, backgrounds >= 1.6 from every one
MIN_AREA = 12  # pixels of a blob in a frame; the smallest shape covers about 70
MIN_FILL = 0.35  # blobs filling less of their bounding box are scattered pixels, not a shape
VISIBLE = 0.75  # fraction of the frames in which an object must be seen
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
MIN_SPEED = 0.5  # pixels per frame below which a blob is not moving
MAX_STEP = 2 * SPEED[1]  # pixels a centroid may move between frames
MAX_CHANGE = 0.1  # mean absolute change of the pixels from one frame to the next

CHECKS = ("count", "colour", "shape", "direction", "smooth")


@dataclass(frozen=True)
class Found:
    """An object seen in a clip."""

    colour: str
    shape: str
    direction: str | None  # None: not moving


class Checked:
    """What a check result of either reference model reports: each check of its `CHECKS`
    passed or not, and the fraction passed."""

    CHECKS: tuple[str, ...] = ()

    @property
    def passed(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in self.CHECKS}

    @property
    def accuracy(self) -> float:
        return sum(self.passed.values()) / len(self.CHECKS)


@dataclass(frozen=True)
class CheckResult(Checked):
    CHECKS = CHECKS
    count: bool
    colour: bool
    shape: bool
    direction: bool
    smooth: bool
    found: tuple[Found, ...]


def find_objects(clip: torch.Tensor) -> tuple[tuple[Found, ...], float]:
    """The objects in a clip [3, F, H, W] and the largest step of any centroid, in pixels."""
    mask = palette_masks(clip.detach().float().cpu(), COLOUR_RADIUS)
    area, centroid, fill, visible = blobs(mask, MIN_AREA, MIN_FILL)

    found, max_step = [], 0.0
    for p, colour in enumerate(COLOURS):
        if visible[p].float().mean() < VISIBLE:
            continue
        ratio = fill[p][visible[p]].median().item()
        shape = min(FILL, key=lambda s: abs(FILL[s] - ratio))
        found.append(Found(colour, shape, _direction(centroid[p], visible[p])))
        both = visible[p, 1:] & visible[p, :-1]
        steps = torch.linalg.vector_norm(centroid[p, 1:] - centroid[p, :-1], dim=-1)[both]
        max_step = max(max_step, steps.max().item() if len(steps) else 0.0)
    return tuple(found), max_step


def palette_masks(clip: torch.Tensor, radius: float) -> torch.Tensor:
    """[P, F, H, W]: the pixels of a clip [3, F, H, W] within `radius` of each palette colour,
    cleaned by an opening (scattered pixels go), with the pixels next to what survives it put
    back (thin tips, such as a triangle's apex)."""
    palette = torch.tensor(list(PALETTE.values()))
    near = (clip[None] - palette[:, :, None, None, None]).square().sum(1) < radius**2
    core = grow(grow(near, 3, full=True), 3)
    return near & grow(core, 5)


def blobs(mask: torch.Tensor, min_area: int, min_fill: float):
    """Per colour and frame of `mask` [P, F, H, W]: the area, the centroid (x, y), the fill of
    the bounding box, and whether a compact blob is visible (`min_area` pixels, filling at least
    `min_fill` of its box)."""
    height, width = mask.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    area = mask.sum((-2, -1)).float()  # [P, F]
    centroid = torch.stack([(xs * mask).sum((-2, -1)), (ys * mask).sum((-2, -1))], -1) / area.clamp(min=1)[..., None]
    extent = [
        (torch.where(mask, c, -1.0).amax((-2, -1)) - torch.where(mask, c, float(size)).amin((-2, -1)) + 1).clamp(min=1)
        for c, size in ((xs, width), (ys, height))
    ]
    fill = area / (extent[0] * extent[1])
    return area, centroid, fill, (area >= min_area) & (fill >= min_fill)


def grow(mask: torch.Tensor, size: int, full: bool = False) -> torch.Tensor:
    """Dilate a boolean mask [..., H, W] by a size x size square; `full`: erode instead."""
    counts = F.conv2d(mask.flatten(0, -3)[:, None].float(), torch.ones(1, 1, size, size), padding=size // 2)
    return (counts[:, 0] >= (size * size if full else 1)).view(mask.shape)


def _direction(centroid: torch.Tensor, visible: torch.Tensor) -> str | None:
    """Direction of the least-squares velocity of a centroid over the first half of the clip."""
    frames = torch.arange(FRAMES // 2 + 1)
    frames = frames[visible[frames]]
    if len(frames) < 3:
        return None
    t = frames.float() - frames.float().mean()
    velocity = (t[:, None] * centroid[frames]).sum(0) / (t**2).sum()
    if velocity.norm() < MIN_SPEED:
        return None
    units = F.normalize(torch.tensor(list(DIRECTIONS.values())), dim=-1)
    return tuple(DIRECTIONS)[int((units @ velocity).argmax())]


def check_clip(clip: torch.Tensor, prompt: Prompt) -> CheckResult:
    """Judge one clip [3, F, H, W] in [-1, 1] against its prompt."""
    found, max_step = find_objects(clip)
    change = (clip[:, 1:] - clip[:, :-1]).abs().mean((0, 2, 3)).max().item()
    wanted = prompt.objects
    candidates = list(found) + [None] * len(wanted)

    def agreement(match):
        return [
            (f is not None and f.colour == w.colour, f is not None and f.shape == w.shape,
             f is not None and f.direction == w.direction)
            for w, f in zip(wanted, match)
        ]

    def fit(match):  # colours identify objects; the other attributes break ties
        scores = agreement(match)
        return sum(s[0] for s in scores), sum(map(sum, scores))

    best = max(itertools.permutations(candidates, len(wanted)), key=fit)
    colour, shape, direction = (all(column) for column in zip(*agreement(best)))
    return CheckResult(
        count=len(found) == len(wanted),
        colour=colour,
        shape=shape,
        direction=direction,
        smooth=change <= MAX_CHANGE and max_step <= MAX_STEP,
        found=found,
    )


def check_clips(clips: torch.Tensor, prompts: list, check=check_clip) -> list:
    """Judge a batch of clips [B, 3, F, H, W] against their prompts, with `check` (a clip and
    its prompt -> a result with `passed` and `accuracy`; this module's `check_clip` by default)."""
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    return [check(clip, prompt) for clip, prompt in zip(clips, prompts)]


def summarize(results: list) -> dict[str, float]:
    """Fraction of clips passing each check, and `accuracy`: the fraction of all checks passed."""
    summary = {name: sum(r.passed[name] for r in results) / len(results) for name in results[0].passed}
    summary["accuracy"] = sum(r.accuracy for r in results) / len(results)
    return summary
