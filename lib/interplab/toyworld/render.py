"""Deterministic renderer: a Scene (objects + background) -> a 32 x 32 RGB image and exact masks.

Shapes are implicit functions on the object's local grid, textures darken a pattern inside the
object, each object gets a one-pixel dark outline (so a white star stays a star on snow), and
backgrounds are procedural full-frame textures. Everything random comes from the generator the
caller passes, so a (scene, seed) pair always renders the same pixels.
"""
from dataclasses import dataclass, field

import numpy as np

from .attributes import BACKGROUNDS, RADIUS, RGB, SHAPES, SIZE, SLOT_CENTRES, SLOTS, TEXTURES

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str = "plain"
    size: str = "large"
    slot: str = "top left"

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, RGB),
                                     ("texture", self.texture, TEXTURES), ("size", self.size, RADIUS),
                                     ("slot", self.slot, SLOTS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {tuple(allowed)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "dark"
    distractors: tuple[Obj, ...] = field(default=())  # small extra objects, never captioned

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {BACKGROUNDS}")
        slots = [o.slot for o in self.objects + self.distractors]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two objects share a slot: {slots}")


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test on coordinates normalised by the radius (u right, v down), boolean like u."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.78
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (abs(u) <= (v + 1.0) * 0.55)
    if shape == "cross":
        return ((abs(u) <= 0.34) & (abs(v) <= 1.0)) | ((abs(v) <= 0.34) & (abs(u) <= 1.0))
    if shape == "star":  # five points, one up
        theta = np.arctan2(v, u) + np.pi / 2
        return r <= 0.42 + 0.62 * ((1 + np.cos(5 * theta)) / 2) ** 3
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.05
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.5)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def texture_pattern(texture: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Which pixels of an object the texture darkens, from pixel offsets to the object centre."""
    ix, iy = np.floor(dx).astype(int), np.floor(dy).astype(int)
    if texture == "plain":
        return np.zeros(dx.shape, bool)
    if texture == "striped":  # horizontal stripes
        return iy % 3 == 0
    if texture == "ribbed":  # vertical stripes
        return ix % 3 == 0
    if texture == "slanted":
        return (ix + iy) % 4 == 0
    if texture == "dotted":
        return (ix % 3 == 1) & (iy % 3 == 1)
    if texture == "checked":
        return ((ix // 2) + (iy // 2)) % 2 == 0
    if texture == "gridded":
        return (ix % 4 == 0) | (iy % 4 == 0)
    if texture == "ringed":
        return np.floor(np.hypot(dx, dy) / 1.6).astype(int) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")


def background_image(name: str, rng: np.random.Generator) -> np.ndarray:
    """A full-frame procedural background, (32, 32, 3) float32 in [0, 1]."""
    p = rng.uniform(0, 2 * np.pi)
    one = np.ones((SIZE, SIZE, 1), np.float32)
    if name == "dark":
        img = one * np.array([0.06, 0.06, 0.07])
    elif name == "water":  # blue with bright horizontal waves
        wave = (np.sin(_Y / 1.6 + 1.2 * np.sin(_X / 3.0 + p)) > 0.7)[..., None]
        img = one * np.array([0.10, 0.25, 0.60]) + wave * np.array([0.25, 0.30, 0.25])
    elif name == "lake":  # calm teal with sparse ripples
        ripple = (np.sin(np.hypot(_X - 16 + 6 * np.cos(p), _Y - 16) / 1.3) > 0.92)[..., None]
        img = one * np.array([0.08, 0.40, 0.42]) + ripple * np.array([0.15, 0.15, 0.15])
    elif name == "grass":  # vertical blades
        blades = (rng.random((1, SIZE)) < 0.35) & (rng.random((SIZE, SIZE)) < 0.8)
        img = one * np.array([0.25, 0.50, 0.15]) + blades[..., None] * np.array([0.15, 0.20, 0.05])
    elif name == "forest":  # dark canopy blobs
        cx, cy = rng.uniform(0, SIZE, (2, 7, 1, 1))
        blobs = (np.hypot(_X - cx, _Y - cy) < 3.5).any(0)[..., None]
        img = one * np.array([0.05, 0.22, 0.08]) + blobs * np.array([0.08, 0.14, 0.04])
    elif name == "sand":  # diagonal dunes
        dune = (np.sin((_X + 2 * _Y) / 3.0 + p) > 0.5)[..., None]
        img = one * np.array([0.78, 0.66, 0.40]) - dune * np.array([0.12, 0.12, 0.10])
    elif name == "snow":  # white with grey speckles
        speck = (rng.random((SIZE, SIZE)) < 0.12)[..., None]
        img = one * np.array([0.86, 0.88, 0.93]) - speck * np.array([0.20, 0.20, 0.16])
    else:
        raise ValueError(f"unknown background {name!r}; choose from {BACKGROUNDS}")
    return img.astype(np.float32)


def object_centre(obj: Obj, rng: np.random.Generator, jitter: float) -> tuple[float, float]:
    cx, cy = SLOT_CENTRES[obj.slot]
    dx, dy = rng.uniform(-jitter, jitter, 2)
    return cx + dx, cy + dy


def render(scene: Scene, seed: int | np.random.Generator = 0, jitter: float = 1.0, noise: float = 0.03,
           distractor_size: str = "tiny") -> tuple[np.ndarray, np.ndarray]:
    """Render a scene.

    Returns image (32, 32, 3) float32 in [0, 1] and masks (n_objects, 32, 32) bool, one exact
    mask per captioned object (distractors are drawn but get no mask).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    img = background_image(scene.background, rng)
    masks = np.zeros((len(scene.objects), SIZE, SIZE), bool)
    for i, obj in enumerate(scene.objects + scene.distractors):
        cx, cy = object_centre(obj, rng, jitter)
        radius = RADIUS[obj.size if i < len(scene.objects) else distractor_size]
        dx, dy = _X - cx, _Y - cy
        inside = shape_mask(obj.shape, dx / radius, dy / radius)
        outline = _dilate(inside) & ~inside
        colour = np.array(RGB[obj.colour], np.float32)
        dark = texture_pattern(obj.texture, dx, dy) & inside
        img[outline] = 0.0
        img[inside] = colour
        img[dark] = colour * 0.35
        if i < len(scene.objects):
            masks[i] = inside
    if noise:
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), masks


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def render_batch(scenes, seed: int = 0, **kw) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render many scenes with one generator: images (N, 3, 32, 32) float32, list of masks."""
    rng = np.random.default_rng(seed)
    out = [render(s, rng, **kw) for s in scenes]
    return np.stack([o[0].transpose(2, 0, 1) for o in out]), [o[1] for o in out]
