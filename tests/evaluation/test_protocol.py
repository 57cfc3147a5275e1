"""The protocol presets and their prompts (no model needed)."""

from __future__ import annotations

from cns.evaluation.protocol import (
    TINY_WORLD_SETS,
    Protocol,
    multi_prompts,
    preset,
    single_prompts,
    tiny_world_concepts,
)


def test_presets_have_the_papers_sizes():
    paper = preset("paper")
    assert len(paper.sets) == 3 and all(len(s) == 7 for s in paper.sets)
    assert all(len(s) * paper.single_prompts_per_concept == 35 for s in paper.sets)
    assert paper.multi_prompts_per_set == 7 and paper.images_per_prompt == 50 and paper.steps == 500
    quick = preset("quick")
    assert len(quick.sets) == 1 and len(quick.sets[0]) == 7
    assert quick.images_per_prompt < paper.images_per_prompt and quick.steps < paper.steps
    for protocol in (quick, paper):
        kinds = {c.kind for s in protocol.sets for c in tiny_world_concepts(s).values()}
        assert kinds == {"object", "creature", "style", "scene"}
        assert Protocol.from_dict(protocol.to_dict()) == protocol


def test_describe_prints_every_setting():
    text = "\n".join(preset("paper").describe())
    for needle in ("3 x 7, 7, 7 concepts", "single-concept prompts per concept: 5 (per set: 35)",
                   "multi-concept prompts per set: 7", "images per prompt: 50", "best of N", "500 steps",
                   "lr embedding", "LoRA rank", "class images", "DDIM 50 steps", "CLIP conventions: scale x1",
                   "tokens -> class word: yes", " -> ".join(TINY_WORLD_SETS[0])):
        assert needle in text, needle


def test_prompts_name_their_concepts_and_multi_prompts_cover_each_set():
    from cns.world.render import vocabulary_words

    vocab = set(vocabulary_words())
    paper = preset("paper")
    for names in paper.sets:
        concepts = [tiny_world_concepts(names)[n] for n in names]
        tokens = [f"<new{j + 1}>" for j in range(len(names))]
        for c, t in zip(concepts, tokens):
            prompts = single_prompts(paper, c, t)
            assert len(prompts) == 5 and len(set(prompts)) == 5
            assert all(f"{t} {c.class_word}" in p for p in prompts)
        multi = multi_prompts(paper, concepts, tokens)
        assert len(multi) == 7 and len({p for p, _ in multi}) == 7
        covered = set()
        for prompt, indices in multi:
            assert 2 <= len(indices) <= 4
            for i in indices:
                assert f"{tokens[i]} {concepts[i].class_word}" in prompt
            assert sorted(t for t in tokens if t in prompt) == sorted(tokens[i] for i in indices)
            covered |= set(indices)
            # the tiny world's model knows every other word
            assert all(w in vocab for w in prompt.replace(",", " ").split() if not w.startswith("<"))
        assert covered == set(range(len(names)))
