"""The synthetic world: scenes, renders and captions are functions of the seed, and say what the scene holds."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from pipeline.data.synthetic.corpus import attribute_set, make_corpus, render_images
from pipeline.data.synthetic.world import (
    BACKGROUNDS,
    COLOUR_WORDS,
    COLOURS,
    COUNT_WORDS,
    GENERIC_WORDS,
    SHAPE_WORDS,
    SHAPES,
    STYLES,
    Pools,
    Scene,
    SceneObject,
    WorldError,
    caption,
    region_of,
    render,
    sample_scene,
)


def scenes(seed: int, n: int, **pools: object) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **pools) for _ in range(n)]


def one(shape: str = "square", colour: str = "red", size: str = "large", texture: str = "plain",
        centre: tuple[float, float] = (0.5, 0.5), background: str = "white") -> Scene:
    return Scene((SceneObject(shape, colour, size, texture, (centre,)),), background, seed=1)


def test_scenes_are_a_function_of_the_seed() -> None:
    assert scenes(3, 50) == scenes(3, 50)
    assert scenes(3, 50) != scenes(4, 50)


@pytest.mark.parametrize("style", STYLES)
def test_renders_are_a_function_of_the_scene(style: str) -> None:
    for scene in scenes(5, 10):
        a, b = np.asarray(render(scene, 32, style)), np.asarray(render(scene, 32, style))
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)


def test_captions_are_a_function_of_scene_and_rng_and_vary_between_draws() -> None:
    scene = scenes(6, 1)[0]
    assert caption(scene, np.random.default_rng(1)) == caption(scene, np.random.default_rng(1))
    assert len({caption(scene, np.random.default_rng(s)) for s in range(40)}) > 10


def test_render_draws_the_object_in_its_colour_where_it_is() -> None:
    image = np.asarray(render(one(colour="red", centre=(0.3, 0.3), size="small"), 64)).astype(int)
    assert np.abs(image[19, 19] - COLOURS["red"]).max() < 10  # the square's centre (0.3 * 64)
    assert np.abs(image[50, 50] - BACKGROUNDS["white"]).max() < 10  # far corner: background
    big = (np.asarray(render(one(size="large"), 64)) != BACKGROUNDS["white"]).any(-1).mean()
    small = (np.asarray(render(one(size="small"), 64)) != BACKGROUNDS["white"]).any(-1).mean()
    assert big > 2.5 * small


def test_shapes_render_differently() -> None:
    masks = {s: (np.asarray(render(one(shape=s), 32)) != BACKGROUNDS["white"]).any(-1) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 20, (a, b)


def test_styles_shift_the_image() -> None:
    scene = one(texture="plain", colour="blue")
    normal = np.asarray(render(scene, 32)).astype(int)
    lines = np.asarray(render(scene, 32, "lines")).astype(int)
    assert np.abs(lines[16, 16] - BACKGROUNDS["white"]).max() < 10  # outline only: a hollow centre
    assert np.abs(normal[16, 16] - COLOURS["blue"]).max() < 10
    for style in ("noise", "palette"):
        assert np.abs(np.asarray(render(scene, 32, style)).astype(int) - normal).mean() > 5, style
    # Styles combine: "lines+palette" draws the same outline, in the palette's paler, hue-shifted colours.
    pastel_lines = np.asarray(render(scene, 32, "lines+palette")).astype(int)
    ink = np.abs(lines - lines[0, 0]).sum(-1) > 30
    assert ink.any() and np.array_equal(ink, np.abs(pastel_lines - pastel_lines[0, 0]).sum(-1) > 30)
    assert np.abs(pastel_lines[0, 0] - lines[0, 0]).max() > 5  # the background shifts
    assert np.abs(pastel_lines[ink] - lines[ink]).mean() > 5  # and so does the ink
    for bad in ("lines+lines", "normal+noise", "lines+sepia", "lines+"):
        with pytest.raises(WorldError, match="unknown render style"):
            render(scene, 32, bad)
    striped = np.asarray(render(one(texture="striped", colour="blue"), 32)).astype(int)
    assert len({tuple(p) for p in striped[12:20, 12:20].reshape(-1, 3)}) > 1  # a texture is two-toned


def test_pools_restrict_the_draw_and_bad_pools_are_named() -> None:
    drawn = scenes(7, 40, shapes=("star", "heart"), colours=("green",), max_kinds=1, max_count=1)
    assert {o.shape for s in drawn for o in s.objects} <= {"star", "heart"}
    assert {o.colour for s in drawn for o in s.objects} == {"green"}
    assert all(len(s.objects) == 1 and s.objects[0].count == 1 for s in drawn)
    with pytest.raises(WorldError, match="shapes"):
        Pools(shapes=("circle", "hexagon"))
    with pytest.raises(WorldError, match="backgrounds"):
        sample_scene(np.random.default_rng(0), colours=("white",), backgrounds=("white",))


def test_objects_stay_inside_the_image_and_regions_name_where_they_are() -> None:
    for scene in scenes(8, 200):
        for obj in scene.objects:
            assert 1 <= obj.count <= 3
            for x, y in obj.centres:
                assert 0 < x < 1 and 0 < y < 1
    assert region_of(0.1, 0.1) == "top left" and region_of(0.5, 0.5) == "centre"
    assert region_of(0.9, 0.5) == "right" and region_of(0.5, 0.99) == "bottom"


def _words(table: dict[str, tuple]) -> dict[str, list[str]]:
    return {k: [w[0] if isinstance(w, tuple) else w for w in v] for k, v in table.items()}


def test_captions_mention_the_scene_shape_colour_and_count() -> None:
    rng = np.random.default_rng(9)
    shape_words, colour_words = _words(SHAPE_WORDS), _words(COLOUR_WORDS)
    generic = [g for g, _ in GENERIC_WORDS]
    named_colour = 0
    drawn = scenes(10, 300, max_kinds=1)
    for scene in drawn:
        obj = scene.objects[0]
        text = caption(scene, rng)
        # The background phrase may name a colour too ("dark blue"): check the objects' part alone.
        text = re.split(r" (on|against|with) (a )?\S+ ", text + " ")[0]
        assert any(w in text for w in shape_words[obj.shape] + generic), text
        others = [w for c, ws in colour_words.items() if c != obj.colour for w in ws]
        assert not any(re.search(rf"\b{w}\b", text) for w in others), text
        named_colour += any(re.search(rf"\b{w}\b", text) for w in colour_words[obj.colour])
        if obj.count > 1:
            assert any(w in text for w in COUNT_WORDS[obj.count]), text
    assert named_colour > 0.7 * len(drawn)
    assert any(s.objects[0].count > 1 for s in drawn)


def test_corpus_pairs_depend_on_seed_split_and_index_only() -> None:
    small, large = make_corpus(1, 5), make_corpus(1, 12)
    assert small.scenes == large.scenes[:5] and small.captions == large.captions[:5]
    assert make_corpus(1, 5, "heldout").scenes != small.scenes
    assert make_corpus(2, 5).scenes != small.scenes
    assert np.array_equal(small.images(32), render_images(large.scenes[:5], 32))
    with pytest.raises(WorldError, match="split"):
        make_corpus(1, 2, "test")


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_attribute_sets_are_balanced_and_labelled_by_the_attribute(attribute: str) -> None:
    pools = dataclasses.replace(Pools(), shapes=("circle", "square", "star"), colours=("red", "blue"))
    drawn, labels, classes = attribute_set(0, 30, attribute, pools)
    assert classes == (["circle", "square", "star"] if attribute == "shape" else ["red", "blue"])
    assert np.bincount(labels).tolist() == [30 // len(classes)] * len(classes)
    for scene, label in zip(drawn, labels, strict=True):
        assert len(scene.objects) == 1 and scene.objects[0].count == 1
        assert getattr(scene.objects[0], attribute) == classes[label]
