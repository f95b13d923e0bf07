"""Procedural clips of moving shapes, each with the prompt that describes it.

The reference model is trained on these clips and its generations are judged against their
prompts (`checks.py`), so everything a prompt says is visible and measurable in the clip:
flat palette colours on dark backgrounds (colour is a distance to the palette), upright
shapes with distinct bounding-box fill ratios, a motion that keeps the prompted direction for
the first half of the clip (walls may reverse it afterwards), and two objects that never
overlap.

Scene parameters are drawn with a numpy Generator, a whole batch at a time, so the same seed
gives the same clips and prompts on any device; rendering is one vectorised torch
computation over clips, objects, frames and pixels, fast enough to run inside a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FRAMES = 16
SIZE = 64
MAX_OBJECTS = 2
SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "magenta": (1.0, -1.0, 1.0),
    "cyan": (-1.0, 1.0, 1.0),
}
COLOURS = tuple(PALETTE)
DIRECTIONS = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-1.0, -1.0),
    "up-right": (1.0, -1.0),
    "down-left": (-1.0, 1.0),
    "down-right": (1.0, 1.0),
}
BACKGROUNDS = ("plain", "gradient")

HALF_SIZE = (6.0, 9.0)  # half the side of a shape's bounding box, pixels
SPEED = (1.25, 2.5)  # pixels per frame
BACKGROUND_LEVEL = (-1.0, -0.5)  # every background channel stays this dark
GAP = 2.0  # pixels between the boxes of two objects
MAX_REDRAWS = 100


def require_known(obj, **allowed) -> None:
    """Raise ValueError naming the first field of `obj` outside its allowed values."""
    for name, values in allowed.items():
        if getattr(obj, name) not in values:
            raise ValueError(f"unknown {name} {getattr(obj, name)!r}; known: {', '.join(values)}")


def require_objects(objects, max_objects: int) -> None:
    """A prompt's objects: 1 to `max_objects` of them, of distinct colours."""
    if not 1 <= len(objects) <= max_objects:
        raise ValueError(f"a prompt has 1 to {max_objects} objects, got {len(objects)}")
    if len({o.colour for o in objects}) != len(objects):
        raise ValueError("the objects of a prompt must have distinct colours")


@dataclass(frozen=True)
class ObjectPrompt:
    shape: str
    colour: str
    direction: str

    def __post_init__(self):
        require_known(self, shape=SHAPES, colour=COLOURS, direction=DIRECTIONS)

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class Prompt:
    """What a clip shows: one or two objects of distinct colours, and its background."""

    objects: tuple[ObjectPrompt, ...]
    background: str = "plain"

    def __post_init__(self):
        require_objects(self.objects, MAX_OBJECTS)
        require_known(self, background=BACKGROUNDS)

    @property
    def text(self) -> str:
        return " and ".join(o.text for o in self.objects) + f" on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Read back `Prompt.text`, e.g. "a red circle moving left on a plain background"."""
        words = text.split()
        if len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
            raise ValueError(f"{text!r} does not end with 'on a plain|gradient background'")
        objects = []
        for part in " ".join(words[:-4]).split(" and "):
            a, colour, shape, moving, direction, *rest = part.split() + [""] * 5
            if a != "a" or moving != "moving" or any(rest):
                raise ValueError(f"{part!r} is not of the form 'a COLOUR SHAPE moving DIRECTION'")
            objects.append(ObjectPrompt(shape, colour, direction))
        return cls(tuple(objects), words[-2])


@dataclass(frozen=True)
class Scenes:
    """Parameters of a batch of clips, one row per clip, one column per object slot.

    Slots at or past a clip's `count` exist but are not drawn.
    """

    count: np.ndarray  # [B] int, 1..MAX_OBJECTS
    shape: np.ndarray  # [B, O] index into SHAPES
    colour: np.ndarray  # [B, O] index into COLOURS
    direction: np.ndarray  # [B, O] index into DIRECTIONS
    half_size: np.ndarray  # [B, O] pixels
    start: np.ndarray  # [B, O, 2] centre (x, y) at frame 0, pixels
    velocity: np.ndarray  # [B, O, 2] pixels per frame, before bounces
    background: np.ndarray  # [B] index into BACKGROUNDS
    background_colours: np.ndarray  # [B, 2, 3] gradient end colours (equal when plain)
    background_angle: np.ndarray  # [B] direction of the gradient, radians

    def __len__(self) -> int:
        return len(self.count)

    def prompts(self) -> list[Prompt]:
        directions = tuple(DIRECTIONS)
        return [
            Prompt(
                tuple(
                    ObjectPrompt(SHAPES[self.shape[b, o]], COLOURS[self.colour[b, o]], directions[self.direction[b, o]])
                    for o in range(self.count[b])
                ),
                BACKGROUNDS[self.background[b]],
            )
            for b in range(len(self))
        ]


def sample_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """`n` random scenes: what to show, then where and how fast."""
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    first = rng.integers(0, len(COLOURS), n)
    colour = np.stack([first, (first + rng.integers(1, len(COLOURS), n)) % len(COLOURS)], axis=1)
    direction = rng.integers(0, len(DIRECTIONS), (n, MAX_OBJECTS))
    background = rng.integers(0, len(BACKGROUNDS), n)
    return _place(rng, count, shape, colour, direction, background)


def scenes_for(prompts: list[Prompt], rng: np.random.Generator) -> Scenes:
    """Scenes that show the given prompts, with sizes, positions and speeds drawn from `rng`."""
    n = len(prompts)
    index = np.zeros((4, n, MAX_OBJECTS), dtype=np.int64)
    directions = tuple(DIRECTIONS)
    for b, prompt in enumerate(prompts):
        for o, obj in enumerate(prompt.objects):
            index[:, b, o] = SHAPES.index(obj.shape), COLOURS.index(obj.colour), directions.index(obj.direction), 1
    count = index[3].sum(axis=1)
    background = np.array([BACKGROUNDS.index(p.background) for p in prompts], dtype=np.int64)
    return _place(rng, count, index[0], index[1], index[2], background)


def _place(rng, count, shape, colour, direction, background) -> Scenes:
    """Draw sizes, starts, speeds and background colours for the given contents.

    A start is drawn so that the object stays clear of the walls for the first half of the
    clip: the direction a prompt names is the direction of that half. Two objects are redrawn
    until their boxes stay `GAP` pixels apart in every frame, so neither hides the other.
    """
    n = len(count)
    half_size, start, velocity = _motion(rng, direction)
    for _ in range(MAX_REDRAWS):
        centre = _centres(half_size, start, velocity, np.arange(FRAMES))
        apart = np.abs(centre[:, 0] - centre[:, 1]).max(-1) > half_size.sum(-1, keepdims=True) + GAP
        redraw = (count > 1) & ~apart.all(-1)
        if not redraw.any():
            break
        half_size[redraw], start[redraw], velocity[redraw] = _motion(rng, direction[redraw])
    background_colours = rng.uniform(*BACKGROUND_LEVEL, (n, 2, 3))
    plain = background == BACKGROUNDS.index("plain")
    background_colours[plain, 1] = background_colours[plain, 0]
    background_angle = rng.uniform(0, 2 * np.pi, n)
    return Scenes(count, shape, colour, direction, half_size, start, velocity, background,
                  background_colours, background_angle)


def _motion(rng, direction):
    """Sizes, starts and velocities of objects moving in the given directions."""
    half_size = rng.uniform(*HALF_SIZE, direction.shape)
    unit = np.array(list(DIRECTIONS.values()))[direction]
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    velocity = unit * rng.uniform(*SPEED, direction.shape)[..., None]
    low, high = _bounds(half_size)
    travel = velocity * (FRAMES // 2)
    start = rng.uniform(low[..., None] - np.minimum(travel, 0), high[..., None] - np.maximum(travel, 0))
    return half_size, start, velocity


def _bounds(half_size):
    """Range of a shape's centre that keeps it, and one pixel of margin, inside the frame."""
    return half_size + 1.0, SIZE - 2.0 - half_size


def _centres(half_size, start, velocity, frames):
    """Centres [B, O, F, 2] of objects bouncing between the walls; numpy or torch arrays."""
    low, high = _bounds(half_size[..., None, None])
    path = start[:, :, None] + velocity[:, :, None] * frames[:, None]
    phase = (path - low) % (2 * (high - low))
    return high - abs(phase - (high - low))


def render(scenes: Scenes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips of `scenes` as a float32 tensor [B, 3, FRAMES, SIZE, SIZE] with values in [-1, 1]."""

    def tensor(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

    half = tensor(scenes.half_size)
    frames = torch.arange(FRAMES, device=device, dtype=torch.float32)
    centre = _centres(half, tensor(scenes.start), tensor(scenes.velocity), frames)  # [B, O, F, 2]

    pixels = torch.arange(SIZE, device=device, dtype=torch.float32)
    dx = pixels - centre[..., 0, None, None]  # [B, O, F, 1, W]
    dy = pixels[:, None] - centre[..., 1, None, None]  # [B, O, F, H, 1]
    half = half[..., None, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - half
    square = torch.maximum(dx.abs(), dy.abs()) - half
    # upright triangle with apex (0, -half) and base corners (+-half, +half): three half-planes
    slope = (2 * dx.abs() - dy - half) / 5**0.5
    triangle = torch.maximum(dy - half, slope)
    shape = torch.as_tensor(scenes.shape, device=device)[..., None, None, None]
    distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    drawn = torch.arange(MAX_OBJECTS, device=device) < torch.as_tensor(scenes.count, device=device)[:, None]
    alpha = (0.5 - distance).clamp(0, 1) * drawn[..., None, None, None]  # antialiased coverage

    centred = pixels - (SIZE - 1) / 2
    angle = tensor(scenes.background_angle)[:, None, None]
    along = (0.5 + (centred * torch.cos(angle) + centred[:, None] * torch.sin(angle)) / SIZE).clamp(0, 1)
    ends = tensor(scenes.background_colours)[..., None, None]  # [B, 2, 3, 1, 1]
    clip = torch.lerp(ends[:, 0], ends[:, 1], along[:, None])[:, :, None].expand(-1, -1, FRAMES, -1, -1)

    palette = tensor(list(PALETTE.values()))[torch.as_tensor(scenes.colour, device=device)]  # [B, O, 3]
    for o in range(MAX_OBJECTS):
        a = alpha[:, o, None]
        clip = torch.lerp(clip, palette[:, o, :, None, None, None], a)
    return clip.contiguous()


def make_clips(seed: int, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[Prompt]]:
    """`n` clips and their prompts, the same for the same seed."""
    scenes = sample_scenes(np.random.default_rng(seed), n)
    return render(scenes, device), scenes.prompts()
