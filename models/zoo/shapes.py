"""Coloured shapes on 32×32 RGB, rendered by code, with the captions a text-to-image model
learns from and the labels its prompt adherence is judged on.

A scene is one object (colour, shape, size, position) or two objects and a relation ("a red
circle to the left of a blue square"). Captions name every attribute of the scene or only
some ("a red circle"), so a model learns the marginals that guidance pulls away from. Scenes
come from a seeded generator: the same seed gives the same images and captions on every
machine (rendering is plain NumPy, supersampled 4× for anti-aliased edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 32
SUPERSAMPLE = 4
BACKGROUND = (24, 24, 24)
COLOURS = {
    "red": (220, 45, 45),
    "green": (50, 185, 70),
    "blue": (55, 90, 235),
    "yellow": (240, 215, 45),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 8.0, "large": 13.0}  # side (or diameter) in pixels
POSITIONS = {"left": (8.0, 16.0), "right": (24.0, 16.0), "top": (16.0, 8.0), "bottom": (16.0, 24.0)}
# Relations between two objects: the caption's first object is left of / right of / above /
# below the second. Judged as (which object is first in reading order, axis).
RELATIONS = ("to the left of", "to the right of", "above", "below")
JITTER = 1.5  # pixels of random offset on each object's centre


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]  # (x, y) in pixels

    def words(self, with_size: bool) -> str:
        return (
            f"{self.size} {self.colour} {self.shape}"
            if with_size
            else (f"{self.colour} {self.shape}")
        )


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]  # one, or two in caption order
    position: str | None  # the single object's position; None for two objects
    relation: str | None  # two objects: how the first stands to the second

    @property
    def labels(self) -> dict[str, str]:
        """What a judge checks, one value per attribute."""
        first = self.things[0]
        if self.relation is None:
            return {"count": "1", "colour": first.colour, "shape": first.shape,
                    "size": first.size, "position": self.position or ""}  # fmt: skip
        second = self.things[1]
        # Reading order (left to right, top to bottom) and the axis they are laid along.
        flipped = self.relation in ("to the right of", "below")
        a, b = (second, first) if flipped else (first, second)
        axis = "horizontal" if "left" in self.relation or "right" in self.relation else "vertical"
        return {"count": "2", "axis": axis, "colour_a": a.colour, "shape_a": a.shape,
                "colour_b": b.colour, "shape_b": b.shape}  # fmt: skip


def _pick(rng: np.random.Generator, values) -> str:
    values = list(values)
    return values[int(rng.integers(len(values)))]


def _jittered(rng: np.random.Generator, centre: tuple[float, float]) -> tuple[float, float]:
    dx, dy = rng.uniform(-JITTER, JITTER, 2)
    return (centre[0] + float(dx), centre[1] + float(dy))


def random_scene(rng: np.random.Generator) -> Scene:
    """One object (60%) or two with a relation (40%)."""
    if rng.random() < 0.6:
        position = _pick(rng, POSITIONS)
        thing = Thing(_pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, SIZES),
                      _jittered(rng, POSITIONS[position]))  # fmt: skip
        return Scene((thing,), position, None)
    relation = _pick(rng, RELATIONS)
    first_colour = _pick(rng, COLOURS)
    second_colour = _pick(rng, [c for c in COLOURS if c != first_colour])
    horizontal = relation in ("to the left of", "to the right of")
    near, far = ("left", "right") if horizontal else ("top", "bottom")
    first_at, second_at = (near, far) if relation in ("to the left of", "above") else (far, near)
    things = (
        Thing(first_colour, _pick(rng, SHAPES), "small", _jittered(rng, POSITIONS[first_at])),
        Thing(second_colour, _pick(rng, SHAPES), "small", _jittered(rng, POSITIONS[second_at])),
    )
    return Scene(things, None, relation)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of `scene`; single objects sometimes leave out size or position."""
    if scene.relation is not None:
        return full_caption(scene)
    with_size, with_position = rng.random() < 0.7, rng.random() < 0.7
    return full_caption(scene, with_size, with_position)


def full_caption(scene: Scene, with_size: bool = True, with_position: bool = True) -> str:
    """The caption naming every attribute of `scene` (less size or position if asked)."""
    if scene.relation is not None:
        first, second = scene.things
        return f"a {first.words(False)} {scene.relation} a {second.words(False)}"
    thing = scene.things[0]
    text = f"a {thing.words(with_size)}"
    if with_position:
        where = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom"}[scene.position or ""]  # fmt: skip
        text += f" {where}"
    return text


def _mask(shape: str, size: float, centre: tuple[float, float]) -> np.ndarray:
    """Coverage of one shape on the supersampled grid, [S·32, S·32] bool."""
    n = SIDE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - centre[0], y - centre[1]
    half = size / 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    # An upward equilateral-ish triangle in the same box: apex at the top centre.
    inside_height = (dy >= -half) & (dy <= half)
    width_at = (dy + half) / (2 * half) * half  # half-width grows from 0 at the apex
    return inside_height & (np.abs(dx) <= width_at)


def render(scene: Scene) -> np.ndarray:
    """The scene as [32, 32, 3] uint8."""
    n = SIDE * SUPERSAMPLE
    canvas = np.empty((n, n, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    for thing in scene.things:
        canvas[_mask(thing.shape, SIZES[thing.size], thing.centre)] = COLOURS[thing.colour]
    pooled = canvas.reshape(SIDE, SUPERSAMPLE, SIDE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(pooled).astype(np.uint8)


def make_dataset(count: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`count` rendered scenes: images [N, 32, 32, 3] uint8, their captions and scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    captions = [caption(scene, rng) for scene in scenes]
    return np.stack([render(scene) for scene in scenes]), captions, scenes
