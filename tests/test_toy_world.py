"""The toy world (scenes, captions, layouts) and its judge, on rendered scenes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from src.toy import judge as toy
from src.toy.world import COLOURS, SHAPE_CLASS, SHAPES, parse_caption, render, scene_at


def test_scenes_are_a_pure_function_of_seed_and_index():
    assert scene_at(0, 5) == scene_at(0, 5)
    assert scene_at(0, 5) != scene_at(0, 6) and scene_at(0, 5) != scene_at(1, 5)
    rgb_a, labels_a = render(scene_at(0, 5))
    rgb_b, labels_b = render(scene_at(0, 5))
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(labels_a, labels_b)


def test_captions_follow_the_grammar_and_name_what_is_drawn():
    counts = {1: 0, 2: 0}
    for index in range(300):
        scene = scene_at(0, index)
        pairs = parse_caption(scene.caption)
        assert pairs == [(s.colour, s.kind) for s in scene.shapes]
        counts[len(pairs)] += 1
        _, labels = render(scene)
        assert set(np.unique(labels)) - {0} == {SHAPE_CLASS[s.kind] for s in scene.shapes}
    assert counts[1] > 100 and counts[2] > 100
    every = {(s.colour, s.kind) for i in range(300) for s in scene_at(0, i).shapes}
    assert every == {(c, s) for c in COLOURS for s in SHAPES}


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle and",
        "a purple circle",
        "the red circle",
        "a red circle and a blue square and a green triangle",
    ],
)
def test_parse_caption_rejects_what_the_grammar_does_not_allow(caption):
    with pytest.raises(ValueError, match="toy-world caption|one or two"):
        parse_caption(caption)


@pytest.mark.parametrize("resolution", [64, 128])
def test_the_judge_scores_real_toy_images_near_perfectly(resolution):
    images, captions, pixel_accuracy = [], [], []
    for index in range(200):
        scene = scene_at(7, index)
        rgb, labels = render(scene, resolution)
        images.append(rgb)
        captions.append(scene.caption)
        pixel_accuracy.append(float((toy.segment(rgb) == labels).mean()))
    fidelity = toy.caption_fidelity(images, captions)
    assert min(fidelity.values()) >= 0.98, fidelity
    assert np.mean(pixel_accuracy) > 0.95
    chance = toy.caption_fidelity(images, toy.shuffled(captions, seed=0))
    assert chance["object_acc"] < 0.4 and chance["colour_acc"] < 0.6  # the same images, other captions


def test_the_judge_sees_nothing_in_a_blank_image_and_mis_coloured_shapes_fail():
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert toy.parse_scene(blank) == []
    assert toy.judge(blank, "a red circle") == {
        "colour_acc": 0.0,
        "shape_acc": 0.0,
        "object_acc": 0.0,
        "count_acc": 0.0,
        "dominant_colour_acc": 0.0,
    }
    scene = scene_at(0, 1)
    rgb, _ = render(scene)
    (colour, shape), *_ = parse_caption(scene.caption)
    other = next(c for c in COLOURS if c != colour)
    assert toy.judge(rgb, f"a {other} {shape}")["object_acc"] == 0.0


def test_shape_miou_is_one_for_the_truth_and_low_against_other_label_maps():
    labels = [render(scene_at(2, i))[1] for i in range(8)]
    assert toy.shape_miou(labels, labels) == pytest.approx(1.0)
    assert toy.shape_miou(labels, labels[1:] + labels[:1]) < 0.3
    assert toy.shape_miou([np.zeros_like(labels[0])] * 8, labels) == 0.0


def test_the_tokenizer_knows_every_toy_word_whole():
    from src.models.tiny import build_tokenizer
    from src.toy.backbone import toy_words

    tokenizer = build_tokenizer(toy_words(), 16)
    for word in toy_words():
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    assert len(tokenizer.tokenize("a yellow triangle and a green square")) == 7
    assert "".join(tokenizer.tokenize("zebra")).replace("</w>", "") == "zebra"  # other text still tokenizes
