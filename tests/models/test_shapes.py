"""The shapes renderer: deterministic scenes, captions that name what is drawn, labels that
agree with the geometry."""

from __future__ import annotations

import numpy as np

from denoised.models.zoo.shapes import COLOURS, SIZES, make_dataset, render


def test_the_same_seed_gives_the_same_scenes() -> None:
    a, captions_a, _ = make_dataset(16, seed=3)
    b, captions_b, _ = make_dataset(16, seed=3)
    c, _, _ = make_dataset(16, seed=4)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)


def test_captions_name_what_is_drawn() -> None:
    images, captions, scenes = make_dataset(200, seed=0)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    for image, text, scene in zip(images, captions, scenes, strict=True):
        for thing in scene.things:
            assert f"{thing.colour} {thing.shape}" in text
            # The object's colour is what its centre pixel shows.
            x, y = (int(v) for v in thing.centre)
            assert np.abs(image[y, x].astype(int) - COLOURS[thing.colour]).max() <= 1
        if scene.relation is not None:
            assert scene.relation in text


def test_pair_labels_follow_reading_order() -> None:
    _, _, scenes = make_dataset(300, seed=1)
    pairs = [s for s in scenes if s.relation is not None]
    assert len(pairs) > 50
    for scene in pairs:
        labels = scene.labels
        a = next(
            t
            for t in scene.things
            if (t.colour, t.shape) == (labels["colour_a"], labels["shape_a"])
        )
        b = next(t for t in scene.things if t is not a)
        axis = 0 if labels["axis"] == "horizontal" else 1
        assert a.centre[axis] < b.centre[axis]  # a is left of (or above) b


def test_sizes_differ_in_area() -> None:
    _, _, scenes = make_dataset(200, seed=2)
    area = {size: [] for size in SIZES}
    for scene in scenes:
        if scene.relation is None:
            lit = (render(scene).astype(int).sum(-1) > 3 * 30).sum()
            area[scene.things[0].size].append(lit)
    assert min(area["large"]) > max(area["small"])
