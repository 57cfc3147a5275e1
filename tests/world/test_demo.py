"""The demo's prompts put each kind of concept in the slot the world's captions have for it."""

from cns.world.concepts import get_concept
from cns.world.demo import DEFAULT_DEMO_CONCEPTS, _multi_prompts, concept_prompt
from cns.world.render import caption_words, vocabulary_words


def test_concept_prompts_use_the_token_in_its_slot_and_world_words_only():
    assert concept_prompt("object", "<new1>", "heart") == "a big <new1> heart in the center, on a gray background, flat style"
    assert concept_prompt("scene", "<new2>", "background").endswith("on a <new2> background, flat style")
    assert concept_prompt("style", "<new3>", "style").endswith(", <new3> style")
    # without a token the prompt is a plain world caption the base model understands
    for kind, word in [("object", "heart"), ("creature", "bird"), ("scene", "background"), ("style", "style")]:
        for which in (0, 1):
            assert set(caption_words(concept_prompt(kind, "", word, which))) <= set(vocabulary_words())


def test_demo_covers_several_kinds_and_combines_them():
    concepts = [get_concept(n) for n in DEFAULT_DEMO_CONCEPTS]
    assert len({c.kind for c in concepts}) >= 3
    learned = [(c, f"<new{i + 1}>") for i, c in enumerate(concepts)]
    prompts = _multi_prompts(learned)
    assert any(len(names) == 3 for _, names in prompts)  # object + scene + style in one prompt
    for prompt, names in prompts:
        assert all(f"<new{i + 1}>" in prompt for i, c in enumerate(concepts) if c.name in names)


def test_overview_grid_puts_examples_base_and_learned_images_in_one_row_per_concept(tmp_path):
    from PIL import Image

    from cns.generate import image_grid
    from cns.world.demo import _overview_grid

    (tmp_path / "concepts" / "a").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64), (10 * k, 0, 0)).save(tmp_path / "concepts" / "a" / f"{k}.png")
    colors = {"before": (0, 0, 255), "after": (0, 255, 0), "multi": (255, 255, 0)}
    for name, color in colors.items():
        image_grid([Image.new("RGB", (32, 32), color)] * 2, cols=2).save(tmp_path / "images" / f"{name}.png")
    results = {
        "concepts": [{"token": "<new1>", "name": "a", "examples": "concepts/a", "before_image": "images/before.png",
                      "after_image": "images/after.png"}],
        "multi": [{"concepts": ["a", "b"], "image": "images/multi.png"}],
    }
    grid = _overview_grid(tmp_path, results, cell=16, pad=2)
    pixels = grid.load()
    row0 = 18 + 8  # header, then the middle of the first row of cells
    seen = {pixels[x, row0] for x in range(grid.width)}
    assert colors["before"] in seen and colors["after"] in seen and (20, 0, 0) in seen
    row1 = 18 + 18 + 8
    assert colors["multi"] in {pixels[x, row1] for x in range(grid.width)}
    # 3 examples + 2 base + 2 learned cells of 16 px, with the label column and gaps
    assert grid.width == 150 + 3 * 18 + 2 * 18 + 2 * 18 + 3 * 12


def test_demo_runs_end_to_end_on_the_shipped_world(tmp_path):
    """The main job, shrunk (2 concepts, 2 training steps, 1 image a prompt): it writes the report,
    the overview picture and a sound library whose tokens are the concepts it learned."""
    import json
    import math

    import pytest

    from cns.library import ConceptLibrary
    from cns.world.demo import DemoSettings, run_demo
    from cns.world.evaluator import EVALUATOR_PATH
    from cns.world.pretrain import DEFAULT_MODEL_PATH

    if not (DEFAULT_MODEL_PATH / "model_index.json").is_file() or not (EVALUATOR_PATH / "config.json").is_file():
        pytest.skip("tiny-world weights not built")
    settings = DemoSettings(out=tmp_path / "demo", concepts=("starry-night", "berry-heart"), steps=2,
                            num_class_images=1, images_per_prompt=1, sample_steps=2)
    results = run_demo(settings, progress=False)
    assert [c["name"] for c in results["concepts"]] == ["starry-night", "berry-heart"]
    for c in results["concepts"]:
        assert all(math.isfinite(c[when][m]) for when in ("before", "after") for m in ("clip_i", "clip_t"))
        assert 0 < c["density"] < 1
    assert results["concepts"][0]["after_later_tasks"]  # the first concept is measured again after the second
    assert [m["concepts"] for m in results["multi"]] == [["berry-heart", "starry-night"]]  # object in the scene
    out = settings.out
    assert (out / "overview.png").is_file() and "overview.png" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["concepts"][1]["token"] == "<new2>"
    library = ConceptLibrary(out / "library")
    assert library.verify() == []
    assert [c["token"] for c in library.summary()["concepts"]] == ["<new1>", "<new2>"]
