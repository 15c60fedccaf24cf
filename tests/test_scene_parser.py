"""The shapes-world scene parser: exact on the world's own images, honest about anything else."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from glimpse.data.scene_parser import SceneParse, parse_scene, scene_accuracy
from glimpse.data.shapes import _RADIUS, _RGB, COLOURS, _background, _draw, _png, draw_shape, scene_key


def _split(world, split):
    images = json.loads((world / "annotations" / f"captions_{split}.json").read_text())["images"]
    return [(Image.open(world / "images" / split / im["file_name"]).convert("RGB"), im["scene"]) for im in images]


@pytest.mark.parametrize("split", ["test", "test_novel"])
def test_world_images_parse_exactly(world, split):
    images = _split(world, split)
    parses = [parse_scene(image) for image, _ in images]
    assert scene_accuracy(parses, [scene for _, scene in images]) == {"exact": 1.0, "per_object": 1.0,
                                                                       "extra": 0.0, "n": len(images)}
    assert len(images) == 40 and min(min(p.ious) for p in parses) > 0.8


def test_any_image_size_and_array_input(world):
    for image, scene in _split(world, "test")[:4]:
        for resized in (image.resize((64, 64), Image.LANCZOS), image.resize((96, 96), Image.BICUBIC)):
            parse = parse_scene(np.asarray(resized))
            assert parse.key == scene_key(scene) and not parse.extra, parse.reasons


def test_blob_outside_the_anchors_is_extra(world):
    image, scene = _split(world, "test")[0]
    pixels = np.asarray(image).copy()
    pixels[1:5, 1:5] = _RGB["blue"]  # a top-left corner is outside every anchor's window
    parse = parse_scene(pixels)
    assert parse.extra and "outside every anchor window" in parse.reasons[0]
    assert parse.key == scene_key(scene)  # the world's objects are still read


@pytest.mark.parametrize("seed", range(8))
def test_blank_backgrounds_hold_no_objects(seed):
    # the world's own backgrounds: plain, faint noise or a gradient (the generator's choice by seed)
    parse = parse_scene(_background(np.random.default_rng(seed), 32))
    assert parse.objects == [] and not parse.extra, parse.reasons


def test_any_palette_colour_is_read(world):
    for _, scene in _split(world, "test")[:6]:
        for colour in COLOURS:
            swapped = [dict(o, colour=colour) if k == 0 else o for k, o in enumerate(scene)]
            image = Image.open(io.BytesIO(_png(_draw(swapped, np.random.default_rng(7), 32)[0], 32)))
            parse = parse_scene(image)
            assert parse.key == scene_key(swapped) and not parse.extra, (swapped, parse)


def test_mild_noise_and_blur_keep_the_scene(world):
    rng = np.random.default_rng(0)
    for image, scene in _split(world, "test_novel")[:8]:
        noisy = np.clip(np.asarray(image, float) + rng.normal(0, 6, (32, 32, 3)), 0, 255).astype(np.uint8)
        for changed in (noisy, image.filter(ImageFilter.GaussianBlur(0.5))):
            parse = parse_scene(changed)
            assert parse.key == scene_key(scene) and not parse.extra, parse.reasons


def _canvas(draw_more, size=64):
    """A plain world background with whatever ``draw_more(draw, big)`` adds, drawn as the world draws."""
    big = size * 4
    canvas = Image.new("RGB", (big, big), (236, 236, 236))
    draw_more(ImageDraw.Draw(canvas), big)
    return canvas.resize((size, size), Image.LANCZOS)


def test_things_that_are_no_world_object_are_extra():
    def two_colours(d, big):
        draw_shape(d, "square", big / 2, big / 2, _RADIUS["large"] * big, _RGB["red"])
        d.rectangle([big / 2, 0.38 * big, 0.62 * big, 0.62 * big], fill=_RGB["blue"])

    def ring(d, big):
        draw_shape(d, "circle", big / 2, big / 2, _RADIUS["large"] * big, _RGB["green"])
        draw_shape(d, "circle", big / 2, big / 2, 0.07 * big, (236, 236, 236))

    cases = {
        "mixed colours": two_colours,
        "off the palette": lambda d, big: draw_shape(d, "square", big / 2, big / 2, 0.12 * big, (30, 30, 30)),
        "matches no shape": ring,
        "away from its anchor": lambda d, big: draw_shape(d, "circle", big / 2, 0.45 * big, 0.08 * big, _RGB["red"]),
    }
    for what, draw_more in cases.items():
        parse = parse_scene(_canvas(draw_more))
        assert parse.extra and any(what in r for r in parse.reasons), (what, parse.reasons)
    sharp = parse_scene(_canvas(lambda d, big: draw_shape(d, "cross", big / 2, big / 2, 0.12 * big, _RGB["purple"])))
    assert sharp.key == (("large", "purple", "cross", "centre"),) and not sharp.extra


def test_bad_input_is_refused():
    for bad in (np.zeros((32, 40, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((32, 32, 3), float)):
        with pytest.raises(ValueError):
            parse_scene(bad)


def test_scene_accuracy_by_hand():
    def obj(size, colour, shape, position):
        return {"size": size, "colour": colour, "shape": shape, "position": position}

    a, b, c = obj("large", "red", "circle", "left"), obj("small", "blue", "cross", "top"), obj("small", "green", "square", "centre")
    scenes = [[a, b], [c], [a, b, c], [b]]
    parses = [SceneParse([b, a]),  # exact (order does not matter)
              SceneParse([c], extra=True, reasons=["a blob"]),  # right objects, but something else too
              SceneParse([a, dict(b, colour="red"), c, obj("large", "blue", "square", "right")]),  # 2 of 3, one made up
              SceneParse([])]  # nothing found
    # exact: only the first; per_object: 2 + 1 + 2 + 0 of 2 + 1 + 3 + 1 objects
    assert scene_accuracy(parses, scenes) == {"exact": 0.25, "per_object": 5 / 7, "extra": 0.25, "n": 4}
    assert parses[0].key == scene_key([a, b])
    with pytest.raises(ValueError):
        scene_accuracy(parses, scenes[:3])
