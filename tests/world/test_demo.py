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
