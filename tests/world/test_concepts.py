"""Tests for the tiny world's personal concepts."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from cns.world import concepts as concepts_module
from cns.world.concepts import (
    CONCEPTS,
    KINDS,
    concept_scenes,
    concepts_of_kind,
    get_concept,
    insert_token,
    make_concept_images,
    write_all_concepts,
    write_concept_folder,
)
from cns.world.render import (
    BACKGROUNDS,
    CREATURES,
    RESERVED_LOOKS,
    SHAPES,
    STYLES,
    ObjectSpec,
    Scene,
    background_recipe,
    caption,
    caption_words,
    is_held_out,
    object_looks,
    parse_caption,
    render,
    sample_scene,
    style_recipe,
    vocabulary_words,
)

CLASS_WORDS = {"style": {"style"}, "scene": {"background"}, "object": set(SHAPES), "creature": set(CREATURES)}


@pytest.fixture(scope="module")
def examples():
    """name -> list of (image, caption) at 32 px, 5 per concept."""
    return {c.name: make_concept_images(c, n=5, size=32, seed=0) for c in CONCEPTS}


@pytest.fixture(scope="module")
def sampled_scenes():
    rng = np.random.default_rng(11)
    return [sample_scene(rng, "train") for _ in range(2000)] + [sample_scene(rng, "heldout") for _ in range(300)]


def appearance(obj: ObjectSpec):
    return obj.shape, obj.color, obj.decorations, obj.part_colors


def test_at_least_14_concepts_covering_all_kinds():
    assert len(CONCEPTS) >= 14
    assert {c.kind for c in CONCEPTS} == set(KINDS)
    assert all(len(concepts_of_kind(k)) >= 3 for k in KINDS)
    names = [c.name for c in CONCEPTS]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", n) for n in names)


def test_class_words_match_kind_and_vocabulary():
    vocab = set(vocabulary_words())
    for c in CONCEPTS:
        assert c.class_word in CLASS_WORDS[c.kind], c.name
        assert c.class_word in vocab
        if c.kind in ("object", "creature"):
            assert c.subject is not None and c.subject.shape == c.class_word and c.subject.personal
        assert (c.style is not None) == (c.kind == "style")
        assert (c.background is not None) == (c.kind == "scene")
    assert get_concept(CONCEPTS[0].name) is CONCEPTS[0]
    with pytest.raises(KeyError):
        get_concept("no-such-concept")


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_concept_gives_n_images(n):
    concept = CONCEPTS[n]
    images = make_concept_images(concept, n=n, size=32)
    assert len(images) == n
    assert all(im.size == (32, 32) and im.mode == "RGB" for im, _ in images)


@pytest.mark.parametrize("n", [2, 7])
def test_concept_rejects_bad_image_counts(n):
    with pytest.raises(ValueError):
        make_concept_images(CONCEPTS[0], n=n)


def test_concept_images_are_deterministic_and_seeded():
    concept = get_concept("tiger-star")
    a = make_concept_images(concept, n=3, size=32, seed=0)
    b = make_concept_images(concept, n=3, size=32, seed=0)
    c = make_concept_images(concept, n=3, size=32, seed=1)
    assert [im.tobytes() for im, _ in a] == [im.tobytes() for im, _ in b]
    assert [t for _, t in a] == [t for _, t in b]
    assert [im.tobytes() for im, _ in a] != [im.tobytes() for im, _ in c]


def test_concept_examples_vary_layout_and_context(examples):
    for c in CONCEPTS:
        imgs = [np.asarray(im, dtype=np.float32) for im, _ in examples[c.name]]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                assert np.abs(imgs[i] - imgs[j]).mean() > 1.0, c.name
        assert all(im.size == (32, 32) for im, _ in examples[c.name])
        scenes = concept_scenes(c, n=5)
        assert len({len(s.objects) for s in scenes}) == 2, c.name  # alone and with context
        if c.subject is not None:
            subjects = [o for s in scenes for o in s.objects if o.personal]
            assert len(subjects) == 5
            assert {o.size for o in subjects} == {"big", "small"}
            assert len({o.position for o in subjects}) >= 3
        else:
            assert len({s.background if c.kind == "style" else s.style for s in scenes}) >= 2


def test_concept_captions_use_class_word_not_identity(examples):
    vocab = set(vocabulary_words())
    for c in CONCEPTS:
        for _, text in examples[c.name]:
            words = caption_words(text)
            assert set(words) <= vocab, text
            assert words.count(c.class_word) == 1, text
            assert c.name not in text
            objects, background, style = parse_caption(text)
            if c.kind in ("object", "creature"):
                personal = [o for o in objects if o.personal]
                assert len(personal) == 1 and personal[0].shape == c.class_word
                assert background in BACKGROUNDS and style in STYLES
            elif c.kind == "style":
                assert style is None and background in BACKGROUNDS
                assert not any(o.personal for o in objects)
            else:
                assert background is None and style in STYLES
                assert not any(o.personal for o in objects)


def test_captions_match_rendered_scenes(examples):
    for c in CONCEPTS:
        scenes = concept_scenes(c, n=5)
        assert examples[c.name][0][0].tobytes() == render(scenes[0], 32).tobytes()
        for scene, (image, text) in zip(scenes, examples[c.name]):
            assert text == caption(scene)
            objects, _, _ = parse_caption(text)
            assert [(o.shape, o.size, o.position) for o in objects] == [
                (o.shape, o.size, o.position) for o in scene.objects
            ]


def test_context_objects_come_from_the_train_world():
    for c in CONCEPTS:
        for scene in concept_scenes(c, n=6):
            context = [o for o in scene.objects if not o.personal]
            assert all(len(o.decorations) <= 1 and not o.part_colors for o in context)
            assert not any(object_looks(o) & RESERVED_LOOKS for o in context)
            if isinstance(scene.background, str):
                assert not is_held_out(Scene(tuple(context), scene.background))


def test_insert_token():
    star = get_concept("tiger-star")
    assert insert_token("a big star on the left, on a gray background, flat style", star, "sks") == (
        "a big sks star on the left, on a gray background, flat style"
    )
    style = get_concept("mosaic")
    styled = insert_token("a big red star on the left, on a gray background, style", style, "sks")
    assert styled.endswith(", sks style")
    scene = get_concept("starry-night")
    placed = insert_token("a big red star on the left, on a background, flat style", scene, "sks")
    assert "on a sks background" in placed
    with pytest.raises(ValueError):
        insert_token("a big red circle in the center, on a gray background, flat style", star, "sks")


def test_identity_looks_are_reserved_from_pretraining():
    for c in CONCEPTS:
        if c.subject is not None:
            looks = object_looks(c.subject)
            assert looks and looks <= RESERVED_LOOKS, c.name
            # Identity = more than one decoration, or recolored creature parts: both unseen.
            assert len(c.subject.decorations) >= 2 or c.subject.part_colors, c.name


def test_sampler_never_produces_a_concept(sampled_scenes):
    subjects = {appearance(c.subject) for c in CONCEPTS if c.subject is not None}
    styles = [c.style for c in CONCEPTS if c.style is not None]
    backgrounds = [c.background for c in CONCEPTS if c.background is not None]
    for scene in sampled_scenes:
        for obj in scene.objects:
            assert appearance(obj) not in subjects
            assert not object_looks(obj) & RESERVED_LOOKS
        assert style_recipe(scene.style) not in styles
        assert background_recipe(scene.background) not in backgrounds
    assert not set(styles) & set(STYLES.values())
    assert not set(backgrounds) & set(BACKGROUNDS.values())


@pytest.mark.parametrize("size", [32, 64])
def test_concept_styles_and_backgrounds_look_new(size):
    scene = Scene((ObjectSpec("heart", "red", "big", "left"), ObjectSpec("square", "blue", "big", "right")), "gray")
    vocab_styles = [np.asarray(render(replace(scene, style=s), size), np.float32) for s in STYLES]
    for c in concepts_of_kind("style"):
        img = np.asarray(render(replace(scene, style=c.style), size), np.float32)
        assert min(np.abs(img - v).mean() for v in vocab_styles) > 0.5, c.name
    empty = Scene((), "gray")
    vocab_bgs = [np.asarray(render(replace(empty, background=b), size), np.float32) for b in BACKGROUNDS]
    for c in concepts_of_kind("scene"):
        img = np.asarray(render(replace(empty, background=c.background), size), np.float32)
        assert min(np.abs(img - v).mean() for v in vocab_bgs) > 10.0, c.name


def test_concept_subjects_look_unlike_their_plain_class(examples):
    # The personal object differs from the same shape/color without its decorations.
    for c in concepts_of_kind("object") + concepts_of_kind("creature"):
        subject = replace(c.subject, size="big", position="center")
        plain = replace(subject, decorations=(), part_colors=())
        a = np.asarray(render(Scene((subject,), "gray"), 32), np.float32)
        b = np.asarray(render(Scene((plain,), "gray"), 32), np.float32)
        assert np.abs(a - b).mean() > 3.0, c.name


def test_write_concept_folder(tmp_path):
    concept = get_concept("pip-bird")
    out = write_concept_folder(concept, tmp_path / "pip", n=4, size=32, seed=3)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00.png", "01.png", "02.png", "03.png"]
    captions = json.loads((out / "captions.json").read_text())
    assert sorted(captions) == files
    expected = make_concept_images(concept, n=4, size=32, seed=3)
    assert [captions[f] for f in files] == [t for _, t in expected]
    meta = json.loads((out / "concept.json").read_text())
    assert (meta["name"], meta["kind"], meta["class_word"]) == ("pip-bird", "creature", "bird")


def test_write_all_concepts_and_cli(tmp_path, capsys):
    assert concepts_module.main([str(tmp_path), "--n", "3", "--size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == sorted(c.name for c in CONCEPTS)
    for name in folders:
        assert len(list((tmp_path / name).glob("*.png"))) == 3
        assert json.loads((tmp_path / name / "concept.json").read_text())["name"] == name
    again = write_all_concepts(tmp_path / "again", n=3, size=32)
    assert len(again) == len(CONCEPTS)
