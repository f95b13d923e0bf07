"""Procedural clips of textured scenes seen by a moving camera, each with its prompt.

A scene lives in world coordinates: a background that is a sum of a few oriented sinusoids
(so that any camera motion is visible on it, in every direction), and one to three palette
coloured shapes moving in straight lines at a slow or fast speed. The camera is static, pans
in one of four directions, or zooms in or out about the frame centre; screen position is
`centre + zoom(f) * (world - centre - pan(f))`, applied alike to the background and to the
objects (their size scales with the zoom), so a static camera leaves the background unchanged.
Objects have a depth order and are drawn back to front, so they may pass over each other.
Starts are chosen so that every object stays fully inside the frame for the whole clip, which
makes every prompted attribute measurable (`checks.py`).

Parameters are drawn with a numpy Generator a whole batch at a time, so a seed gives the same
clips and prompts on any device; rendering is vectorised torch, fast enough to run on the
training device inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..data import DIRECTIONS, PALETTE, SHAPES, require_known, require_objects

FRAMES = 33
SIZE = 256
MAX_OBJECTS = 3
COLOURS = tuple(PALETTE)
SPEEDS = {"slow": (0.6, 1.0), "fast": (1.6, 2.2)}  # world pixels per frame
BACKGROUNDS = ("striped", "checkered", "wavy", "cloudy")
CAMERAS = ("static", "panning left", "panning right", "panning up", "panning down", "zooming in", "zooming out")
PAN_SPEED = (0.8, 1.2)  # pixels per frame
ZOOM = (1.25, 1.4)  # zoom factor reached at the last frame (its inverse when zooming out)
HALF_SIZE = (14.0, 20.0)  # half the side of a shape's bounding box, world pixels
MARGIN = 2.0  # pixels kept between a shape's box and the frame edge
DARK = ((-1.0, -0.75), (-0.6, -0.35))  # channel ranges of the two background colours
WAVES = 6  # sinusoids per background; unused ones have zero amplitude
MAX_REDRAWS = 100


@dataclass(frozen=True)
class ObjectPrompt:
    shape: str
    colour: str
    direction: str
    speed: str

    def __post_init__(self):
        require_known(self, shape=SHAPES, colour=COLOURS, direction=DIRECTIONS, speed=SPEEDS)

    @property
    def text(self) -> str:
        return f"a {self.speed} {self.colour} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class Prompt:
    """What a clip shows: one to three objects of distinct colours, a background and a camera motion."""

    objects: tuple[ObjectPrompt, ...]
    background: str
    camera: str

    def __post_init__(self):
        require_objects(self.objects, MAX_OBJECTS)
        require_known(self, background=BACKGROUNDS, camera=CAMERAS)

    @property
    def text(self) -> str:
        objects = " and ".join(o.text for o in self.objects)
        return f"{objects} on a {self.background} background, camera {self.camera}"

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Read back `Prompt.text`, e.g. "a fast red circle moving left on a wavy background, camera static"."""
        scene, _, camera = text.partition(", camera ")
        words = scene.split()
        if not camera or len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
            raise ValueError(f"{text!r} does not end with 'on a BACKGROUND background, camera MOTION'")
        objects = []
        for part in " ".join(words[:-4]).split(" and "):
            a, speed, colour, shape, moving, direction, *rest = part.split() + [""] * 6
            if a != "a" or moving != "moving" or any(rest):
                raise ValueError(f"{part!r} is not of the form 'a SPEED COLOUR SHAPE moving DIRECTION'")
            objects.append(ObjectPrompt(shape, colour, direction, speed))
        return cls(tuple(objects), words[-2], camera)


@dataclass(frozen=True)
class Scenes:
    """Parameters of a batch of clips, one row per clip, one column per object slot.

    Slots at or past a clip's `count` exist but are not drawn.
    """

    count: np.ndarray  # [B] int, 1..MAX_OBJECTS
    shape: np.ndarray  # [B, O] index into SHAPES
    colour: np.ndarray  # [B, O] index into COLOURS
    direction: np.ndarray  # [B, O] index into DIRECTIONS
    speed: np.ndarray  # [B, O] index into SPEEDS
    depth: np.ndarray  # [B, O] draw rank, 0 drawn first (farthest)
    half_size: np.ndarray  # [B, O] world pixels
    start: np.ndarray  # [B, O, 2] world centre (x, y) at frame 0, where world and screen agree
    velocity: np.ndarray  # [B, O, 2] world pixels per frame
    background: np.ndarray  # [B] index into BACKGROUNDS
    waves: np.ndarray  # [B, WAVES, 4] angle, wavelength (pixels), phase, amplitude
    background_colours: np.ndarray  # [B, 2, 3] colours at texture values -1 and +1
    camera: np.ndarray  # [B] index into CAMERAS
    pan: np.ndarray  # [B, 2] camera velocity, world pixels per frame
    zoom_rate: np.ndarray  # [B] log of the zoom factor per frame

    def __len__(self) -> int:
        return len(self.count)

    def prompts(self) -> list[Prompt]:
        directions, speeds = tuple(DIRECTIONS), tuple(SPEEDS)
        return [
            Prompt(
                tuple(
                    ObjectPrompt(SHAPES[self.shape[b, o]], COLOURS[self.colour[b, o]],
                                 directions[self.direction[b, o]], speeds[self.speed[b, o]])
                    for o in range(self.count[b])
                ),
                BACKGROUNDS[self.background[b]],
                CAMERAS[self.camera[b]],
            )
            for b in range(len(self))
        ]


def sample_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """`n` random scenes: what to show, then where, how fast, and on what texture."""
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    colour = np.argsort(rng.random((n, len(COLOURS))), axis=1)[:, :MAX_OBJECTS]  # distinct
    direction = rng.integers(0, len(DIRECTIONS), (n, MAX_OBJECTS))
    speed = rng.integers(0, len(SPEEDS), (n, MAX_OBJECTS))
    background = rng.integers(0, len(BACKGROUNDS), n)
    camera = rng.integers(0, len(CAMERAS), n)
    return _place(rng, count, shape, colour, direction, speed, background, camera)


def scenes_for(prompts: list[Prompt], rng: np.random.Generator) -> Scenes:
    """Scenes that show the given prompts, with sizes, positions, speeds and textures drawn from `rng`."""
    n = len(prompts)
    index = np.zeros((5, n, MAX_OBJECTS), dtype=np.int64)
    directions, speeds = tuple(DIRECTIONS), tuple(SPEEDS)
    for b, prompt in enumerate(prompts):
        for o, obj in enumerate(prompt.objects):
            index[:, b, o] = (SHAPES.index(obj.shape), COLOURS.index(obj.colour), directions.index(obj.direction),
                              speeds.index(obj.speed), 1)
    background = np.array([BACKGROUNDS.index(p.background) for p in prompts], dtype=np.int64)
    camera = np.array([CAMERAS.index(p.camera) for p in prompts], dtype=np.int64)
    return _place(rng, index[4].sum(1), *index[:4], background, camera)


def _place(rng, count, shape, colour, direction, speed, background, camera) -> Scenes:
    """Draw the continuous parameters for the given contents."""
    n = len(count)
    depth = np.argsort(rng.random((n, MAX_OBJECTS)), axis=1)
    pan_unit = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (0, 0), (0, 0)], dtype=np.float64)[camera]
    pan = pan_unit * rng.uniform(*PAN_SPEED, (n, 1))
    zoom_sign = np.select([camera == CAMERAS.index("zooming in"), camera == CAMERAS.index("zooming out")], [1.0, -1.0], 0.0)
    zoom_rate = zoom_sign * np.log(rng.uniform(*ZOOM, n)) / (FRAMES - 1)

    unit = np.array(list(DIRECTIONS.values()))[direction]
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    ranges = np.array(list(SPEEDS.values()))[speed]  # [B, O, 2]
    half_size = rng.uniform(*HALF_SIZE, (n, MAX_OBJECTS))
    velocity = unit * rng.uniform(ranges[..., 0], ranges[..., 1])[..., None]
    low, high = _start_range(half_size, velocity, pan, zoom_rate)
    for _ in range(MAX_REDRAWS):  # the ranges above make this rare: shrink objects that cannot fit
        stuck = (low > high).any(-1)
        if not stuck.any():
            break
        half_size[stuck] = rng.uniform(HALF_SIZE[0], half_size[stuck])
        low, high = _start_range(half_size, velocity, pan, zoom_rate)
    else:
        raise RuntimeError("scene sampling could not fit every object inside the frame; check the speed ranges")
    start = rng.uniform(low, high)
    waves, background_colours = _textures(rng, background)
    return Scenes(count, shape, colour, direction, speed, depth, half_size, start, velocity, background,
                  waves, background_colours, camera, pan, zoom_rate)


def _start_range(half_size, velocity, pan, zoom_rate):
    """Per axis, the frame-0 centres [B, O, 2] that keep a shape inside the frame in every frame.

    The screen centre is `c + z(f) * (start - c + (velocity - pan) * f)`, affine in the start,
    so each frame bounds it by an interval and the clip by their intersection.
    """
    f = np.arange(FRAMES)
    z = np.exp(zoom_rate[:, None] * f)[:, None, :, None]  # [B, 1, F, 1]
    drift = (velocity[:, :, None] - pan[:, None, None]) * f[:, None]  # [B, O, F, 2]
    margin = half_size[..., None, None] * z + MARGIN
    c = (SIZE - 1) / 2
    low = ((margin - c) / z - drift).max(2) + c
    high = ((SIZE - 1 - margin - c) / z - drift).min(2) + c
    return low, high


def _textures(rng, background):
    """Sinusoid parameters and the two colours of each background kind.

    striped: one strong wave and a faint crossing one (so motion along the stripes shows);
    checkered: two equal crossing waves; wavy: three waves at 60 degrees; cloudy: six long
    waves at random angles, a smooth noise.
    """
    n = len(background)
    angle = rng.uniform(0, np.pi, (n, 1)) + rng.uniform(0, np.pi, (n, WAVES))
    wavelength = rng.uniform(24, 40, (n, WAVES))
    amplitude = np.zeros((n, WAVES))
    kind = np.array(BACKGROUNDS)[background]
    base = angle[:, :1]
    angle[kind == "striped", 1] = base[kind == "striped", 0] + np.pi / 2
    amplitude[kind == "striped", :2] = (1.0, 0.3)
    angle[kind == "checkered", 1] = base[kind == "checkered", 0] + np.pi / 2
    wavelength[kind == "checkered", 1] = wavelength[kind == "checkered", 0]
    amplitude[kind == "checkered", :2] = 1.0
    angle[kind == "wavy", :3] = base[kind == "wavy"] + np.array([0, np.pi / 3, 2 * np.pi / 3])
    amplitude[kind == "wavy", :3] = 1.0
    wavelength[kind == "cloudy"] = rng.uniform(48, 96, ((kind == "cloudy").sum(), WAVES))
    amplitude[kind == "cloudy"] = rng.uniform(0.5, 1.0, ((kind == "cloudy").sum(), WAVES))
    phase = rng.uniform(0, 2 * np.pi, (n, WAVES))
    colours = np.stack([rng.uniform(*DARK[0], (n, 3)), rng.uniform(*DARK[1], (n, 3))], axis=1)
    return np.stack([angle, wavelength, phase, amplitude], -1), colours


def render(scenes: Scenes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips of `scenes` as a float32 tensor [B, 3, FRAMES, SIZE, SIZE] with values in [-1, 1].

    On the CPU one clip at a time, with the same values: the objects' temporaries are
    [B, MAX_OBJECTS, FRAMES, SIZE, SIZE] (311 MB each for 12 clips), and blocks that large come
    fresh from the kernel, paged in and zeroed, at every operation (twelve clips took 6-14 s
    together, 1.1 s one by one); a clip's 26 MB are reused.
    """
    if len(scenes) > 1 and torch.device(device).type == "cpu":
        clip = lambda b: Scenes(**{f.name: getattr(scenes, f.name)[b : b + 1] for f in fields(scenes)})
        return torch.cat([render(clip(b), device) for b in range(len(scenes))])

    def tensor(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

    c = (SIZE - 1) / 2
    f = torch.arange(FRAMES, device=device, dtype=torch.float32)
    pixels = torch.arange(SIZE, device=device, dtype=torch.float32) - c
    z = torch.exp(tensor(scenes.zoom_rate)[:, None] * f)  # [B, F]
    camera = tensor(scenes.pan)[:, None] * f[:, None]  # [B, F, 2] world offset of the view

    # background: world coordinate of each screen pixel, separable in x and y, so that
    # cos(kx x + ky y + phase) = cos(ax) cos(ay) - sin(ax) sin(ay) is a sum of outer products
    world_x = c + camera[..., 0, None] + pixels / z[..., None]  # [B, F, W]
    world_y = c + camera[..., 1, None] + pixels / z[..., None]  # [B, F, H]
    angle, wavelength, phase, amplitude = tensor(scenes.waves).unbind(-1)  # [B, K]
    k = 2 * torch.pi / wavelength
    ax = (k * torch.cos(angle))[..., None, None] * world_x[:, None] + phase[..., None, None]  # [B, K, F, W]
    ay = (k * torch.sin(angle))[..., None, None] * world_y[:, None]  # [B, K, F, H]
    weight = (amplitude / amplitude.sum(-1, keepdim=True))[..., None, None]
    texture = torch.einsum("bkfh,bkfw->bfhw", weight * torch.cos(ay), torch.cos(ax))
    texture -= torch.einsum("bkfh,bkfw->bfhw", weight * torch.sin(ay), torch.sin(ax))
    ends = tensor(scenes.background_colours)[..., None, None, None]  # [B, 2, 3, 1, 1, 1]
    clip = torch.lerp(ends[:, 0], ends[:, 1], (texture[:, None] + 1) / 2)

    # objects: signed distance in world pixels, antialiased over one screen pixel
    start, velocity = tensor(scenes.start), tensor(scenes.velocity)
    world = start[:, :, None] + velocity[:, :, None] * f[:, None]  # [B, O, F, 2]
    screen = c + z[:, None, :, None] * (world - c - camera[:, None])  # [B, O, F, 2]
    zz = z[:, None, :, None, None]
    dx = (pixels + c - screen[..., 0, None, None]) / zz  # [B, O, F, 1, W]
    dy = (pixels[:, None] + c - screen[..., 1, None, None]) / zz  # [B, O, F, H, 1]
    half = tensor(scenes.half_size)[..., None, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - half
    square = torch.maximum(dx.abs(), dy.abs()) - half
    triangle = torch.maximum(dy - half, (2 * dx.abs() - dy - half) / 5**0.5)  # apex up
    shape = torch.as_tensor(scenes.shape, device=device)[..., None, None, None]
    distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    drawn = torch.arange(MAX_OBJECTS, device=device) < torch.as_tensor(scenes.count, device=device)[:, None]
    alpha = (0.5 - distance * zz).clamp(0, 1) * drawn[..., None, None, None]  # [B, O, F, H, W]
    palette = tensor(list(PALETTE.values()))[torch.as_tensor(scenes.colour, device=device)]  # [B, O, 3]
    order = torch.as_tensor(np.argsort(scenes.depth, axis=1), device=device)  # slot drawn at each rank
    rows = torch.arange(len(scenes), device=device)
    for rank in range(MAX_OBJECTS):
        slot = order[:, rank]
        colour = palette[rows, slot][..., None, None, None]
        clip = torch.lerp(clip, colour, alpha[rows, slot][:, None])
    return clip.contiguous()


def make_clips(seed: int, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[Prompt]]:
    """`n` clips and their prompts, the same for the same seed."""
    scenes = sample_scenes(np.random.default_rng(seed), n)
    return render(scenes, device), scenes.prompts()
