"""Does a clip show what its prompt says? Measured on the pixels, with no learned judge.

Clips are judged at half resolution (128x128), which keeps every object tens of pixels wide
and a quarter of the pixels to judge (about 1 s a clip on two CPU cores).

Camera: the background (every pixel not near a palette colour) of consecutive frames is fitted
with one global motion, a translation plus a uniform scaling about the centre, by least
squares on the brightness-constancy equation Ix u + Iy v + It = 0 (Lucas-Kanade over the whole
frame). The textures are sums of waves tens of pixels long and a frame moves them by under a
pixel, so the linearisation holds. The larger of pan speed and zoom speed (at the frame edge)
names the motion, or "static" when both are small.

Objects are found by colour as in v1 (`..checks`): within `COLOUR_RADIUS` of a palette colour
(backgrounds are far darker), cleaned by a 3x3 opening, visible as a compact blob in most
frames. Each prompt object is matched to a found one and judged on
- colour: the matched blob has the prompted colour;
- shape: the blob's median fill of its bounding box is nearest the shape's;
- direction and speed: its centroid track, mapped back to world coordinates with the fitted
  camera motion, fits a velocity that points nearest the prompted of the eight directions and
  whose length is on the prompted side of the slow/fast boundary;
and the clip as a whole on count (as many objects as the prompt names) and camera.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import checks as v1
from .scenes import COLOURS, DIRECTIONS, SIZE, SPEEDS, Prompt

SCALE = 2  # pixels of the clip per pixel judged
COLOUR_RADIUS = 0.8  # palette colours are >= 2 apart, backgrounds >= 1.35 from every one
MIN_AREA = 20  # judged pixels of a blob in a frame; the smallest shape covers about 50
MIN_FILL = 0.35  # blobs filling less of their bounding box are scattered pixels, not a shape
VISIBLE = 0.6  # fraction of the frames in which an object must be seen (others may hide it)
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
FAST = (SPEEDS["slow"][1] + SPEEDS["fast"][0]) / 2  # clip pixels per frame between slow and fast
MIN_SPEED = 0.3  # clip pixels per frame below which an object or the camera is not moving
OUTLIER = 3.0  # clip pixels off the fitted track: a frame where the object was partly hidden

CHECKS = ("count", "colour", "shape", "direction", "speed", "camera")


@dataclass(frozen=True)
class Found:
    """An object seen in a clip."""

    colour: str
    shape: str
    direction: str | None  # None: not moving
    speed: str | None


@dataclass(frozen=True)
class CheckResult(v1.Checked):
    CHECKS = CHECKS
    count: bool
    colour: bool
    shape: bool
    direction: bool
    speed: bool
    camera: bool
    found: tuple[Found, ...]
    found_camera: str


@dataclass(frozen=True)
class CameraMotion:
    """Screen motion of the background per frame, in clip pixels: shift (u, v) and log-zoom rate."""

    u: float
    v: float
    zoom: float

    @property
    def name(self) -> str:
        pan, zoom = math.hypot(self.u, self.v), abs(self.zoom) * SIZE / 2  # zoom speed at the frame edge
        if max(pan, zoom) < MIN_SPEED:
            return "static"
        if zoom > pan:
            return "zooming in" if self.zoom > 0 else "zooming out"
        moves = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # the camera moves against the view
        return "panning " + max(moves, key=lambda d: -(moves[d][0] * self.u + moves[d][1] * self.v))

    def to_world(self, centroid: torch.Tensor, centre: float) -> torch.Tensor:
        """World positions [F, 2] of screen positions [F, 2] under this motion (frame 0 is the world)."""
        f = torch.arange(len(centroid), dtype=torch.float32)[:, None]
        return centre - torch.tensor([self.u, self.v]) * f + (centroid - centre) * torch.exp(-self.zoom * f)


def camera_motion(small: torch.Tensor, objects: torch.Tensor) -> CameraMotion:
    """The global motion of a half-resolution clip [3, F, H, W] outside the `objects` mask [F, H, W]."""
    grey = small.mean(0)[:, None]  # [F, 1, H, W]
    kernel = torch.exp(-torch.arange(-2.0, 3.0).square() / 2)
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    grey = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), kernel[None, None])[:, 0]
    mean = (grey[1:] + grey[:-1]) / 2
    ix = (mean[..., 1:-1, 2:] - mean[..., 1:-1, :-2]) / 2
    iy = (mean[..., 2:, 1:-1] - mean[..., :-2, 1:-1]) / 2
    it = (grey[1:] - grey[:-1])[..., 1:-1, 1:-1]
    height, width = grey.shape[-2:]
    ys = torch.arange(1, height - 1, dtype=torch.float32)[:, None] - (height - 1) / 2
    xs = torch.arange(1, width - 1, dtype=torch.float32)[None, :] - (width - 1) / 2
    hidden = v1.grow(objects, 5)
    keep = ~(hidden[1:] | hidden[:-1])[..., 1:-1, 1:-1]
    a = torch.stack([ix, iy, ix * xs + iy * ys], -1)[keep].double()  # [N, 3]
    b = -it[keep].double()
    if len(b) < 3:
        return CameraMotion(0.0, 0.0, 0.0)
    u, v, zoom = torch.linalg.lstsq(a.T @ a + 1e-9 * torch.eye(3, dtype=a.dtype), a.T @ b).solution.tolist()
    return CameraMotion(u * SCALE, v * SCALE, zoom)


def find_objects(clip: torch.Tensor) -> tuple[tuple[Found, ...], str]:
    """The objects in a clip [3, F, H, W] and the name of its camera motion."""
    small = F.avg_pool3d(clip.detach().float().cpu()[None], (1, SCALE, SCALE))[0]
    mask = v1.palette_masks(small, COLOUR_RADIUS)  # [P, F, H, W]
    camera = camera_motion(small, mask.any(0))
    area, centroid, fill, visible = v1.blobs(mask, MIN_AREA, MIN_FILL)
    width = mask.shape[-1]

    found = []
    for p, colour in enumerate(COLOURS):
        if visible[p].float().mean() < VISIBLE:
            continue
        ratio = fill[p][visible[p]].median().item()
        shape = min(FILL, key=lambda s: abs(FILL[s] - ratio))
        world = camera.to_world(centroid[p] * SCALE + (SCALE - 1) / 2, (width * SCALE - 1) / 2)
        found.append(Found(colour, shape, *_motion(world, visible[p])))
    return tuple(found), camera.name


def _motion(track: torch.Tensor, visible: torch.Tensor) -> tuple[str | None, str | None]:
    """Direction and speed class of the least-squares velocity of a track [F, 2], refitted without outliers."""
    frames = torch.arange(len(track))[visible]
    for _ in range(2):
        if len(frames) < 3:
            return None, None
        t = frames.float()
        design = torch.stack([torch.ones_like(t), t], -1)
        fit = torch.linalg.lstsq(design, track[frames]).solution  # [2, 2]: position, velocity
        residual = torch.linalg.vector_norm(design @ fit - track[frames], dim=-1)
        frames = frames[residual <= OUTLIER]
    velocity = fit[1]
    if velocity.norm() < MIN_SPEED:
        return None, None
    units = F.normalize(torch.tensor(list(DIRECTIONS.values())), dim=-1)
    direction = tuple(DIRECTIONS)[int((units @ velocity).argmax())]
    return direction, "fast" if velocity.norm() >= FAST else "slow"


def check_clip(clip: torch.Tensor, prompt: Prompt) -> CheckResult:
    """Judge one clip [3, F, H, W] in [-1, 1] against its prompt."""
    found, camera = find_objects(clip)
    wanted = prompt.objects
    candidates = list(found) + [None] * len(wanted)

    def agreement(match):
        return [
            tuple(f is not None and getattr(f, name) == getattr(w, name) for name in ("colour", "shape", "direction", "speed"))
            for w, f in zip(wanted, match)
        ]

    def fit(match):  # colours identify objects; the other attributes break ties
        scores = agreement(match)
        return sum(s[0] for s in scores), sum(map(sum, scores))

    best = max(itertools.permutations(candidates, len(wanted)), key=fit)
    colour, shape, direction, speed = (all(column) for column in zip(*agreement(best)))
    return CheckResult(
        count=len(found) == len(wanted),
        colour=colour,
        shape=shape,
        direction=direction,
        speed=speed,
        camera=camera == prompt.camera,
        found=found,
        found_camera=camera,
    )


def check_clips(clips: torch.Tensor, prompts: list[Prompt]) -> list[CheckResult]:
    """Judge a batch of clips [B, 3, F, H, W] against their prompts."""
    return v1.check_clips(clips, prompts, check_clip)
