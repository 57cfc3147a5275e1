"""The evaluator's architectures (`cns.world.evaluator.build_model`): a ViT ``CLIPModel`` or an
EfficientNet ``VisionTextDualEncoderModel``, both saved by `save_evaluator` and loaded back by
``ClipScorer.from_pretrained`` like any CLIP checkpoint, and both trainable by the evaluator's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cns.evaluation import ClipScorer
from cns.evaluation.metrics import projected_features
from cns.world.evaluator import (
    IMAGE_SIZE,
    EvaluatorConfig,
    attribute_targets,
    build_model,
    build_processor,
    build_tokenizer,
    contrastive_loss,
    eval_scenes,
    match_matrix,
    full_description,
    pixel_values,
    recipe_contrastive_loss,
    recipe_key,
    style_balanced_weights,
    save_evaluator,
)
from cns.world.render import ObjectSpec, Scene, Style, render

SMALL = dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32, text_layers=1,
             text_heads=2, text_mlp=64, projection_dim=16, effnet_width=0.25, effnet_in=(32, 32, 48), effnet_out=(32, 48, 64),
             effnet_strides=(1, 2, 2), effnet_repeats=(1, 1, 1), effnet_expand=(1, 2, 2))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def scenes():
    return eval_scenes(8, "train", seed=11)


@pytest.mark.parametrize("tower, cls", [("vit", "CLIPModel"), ("efficientnet", "VisionTextDualEncoderModel")])
def test_each_tower_saves_and_loads_as_a_dual_encoder(tmp_path, tokenizer, scenes, tower, cls):
    torch.manual_seed(0)
    model = build_model(tokenizer, EvaluatorConfig(image_tower=tower, **SMALL)).eval()
    assert type(model).__name__ == cls
    path = save_evaluator(model, build_processor(tokenizer), tmp_path / tower)
    scorer = ClipScorer.from_pretrained(str(path), device="cpu")
    assert type(scorer.model).__name__ == cls and scorer.dim == 16
    images = [render(s, IMAGE_SIZE) for s in scenes]
    with torch.no_grad():
        direct = model.get_image_features(pixel_values=pixel_values(np.stack([np.asarray(i) for i in images])))
    direct = torch.nn.functional.normalize(projected_features(direct), dim=-1)
    # the processor's math is `pixel_values`' math, and the saved weights are the trained ones
    assert torch.allclose(scorer.image_embeddings(images), direct, atol=1e-4)
    text = scorer.text_embeddings(["a photo of a star", "a red object"])
    assert text.shape == (2, 16) and not torch.allclose(text[0], text[1])


def test_efficientnet_tower_learns_from_the_contrastive_loss(tokenizer, scenes):
    torch.manual_seed(0)
    model = build_model(tokenizer, EvaluatorConfig(image_tower="efficientnet", **SMALL))
    pixels = pixel_values(np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in scenes]))
    descriptions = [full_description(s) for s in scenes]
    matches = torch.from_numpy(match_matrix(descriptions, scenes))
    tokens = tokenizer([d.text for d in descriptions], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
        loss = contrastive_loss(image, text, model.logit_scale, matches)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # every weight of the tower, stem to last stage, gets a gradient
            for name, p in model.vision_model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.8, losses


def test_efficientnet_tower_starts_with_live_activations(tokenizer, scenes):
    """transformers initialises BatchNorm scales at N(0, 0.02); `build_model` re-initialises the
    tower so that renders map to clearly different embeddings from the first training step
    (train mode: BatchNorm normalises with the batch's statistics)."""
    from cns.world.evaluator import reset_to_torch_defaults

    pixels = pixel_values(np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in scenes]))
    torch.manual_seed(0)
    model = build_model(tokenizer, EvaluatorConfig(image_tower="efficientnet")).train()
    bn = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
    assert pooled.shape == (len(scenes), model.config.vision_config.hidden_size)
    assert pooled.std(0).mean() > 1e-2
    # what transformers' own initialisation gives, for contrast
    torch.manual_seed(0)
    from transformers import VisionTextDualEncoderModel

    raw = VisionTextDualEncoderModel(model.config).train()
    with torch.no_grad():
        dead = raw.vision_model(pixel_values=pixels).pooler_output
    assert dead.std(0).mean() < 1e-6
    reset_to_torch_defaults(raw.vision_model)
    with torch.no_grad():
        assert raw.vision_model(pixel_values=pixels).pooler_output.std(0).mean() > 1e-2


def test_recipe_contrastive_loss_pulls_one_recipe_together():
    torch.manual_seed(0)
    keys = ["flat", "flat", "hatched", "hatched", "unique"]
    grouped = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    mixed = grouped[[0, 2, 1, 3, 4]]  # the same points, each recipe split across the two clusters
    low, high = recipe_contrastive_loss(grouped, keys), recipe_contrastive_loss(mixed, keys)
    assert torch.isfinite(low) and low < high - 1.0, (low, high)
    # an anchor without a positive ("unique") is left out; with no positives at all the loss is 0
    assert recipe_contrastive_loss(grouped, ["a", "b", "c", "d", "e"]).item() == 0.0
    # the gradient moves embeddings of one recipe towards each other
    emb = torch.randn(6, 8, requires_grad=True)
    labels = ["x", "x", "x", "y", "y", "y"]
    opt = torch.optim.SGD([emb], lr=0.5)
    def within_minus_across():
        e = torch.nn.functional.normalize(emb.detach(), dim=-1)
        c = e @ e.T
        same = torch.tensor([[a == b for b in labels] for a in labels]) & ~torch.eye(6, dtype=torch.bool)
        other = ~torch.tensor([[a == b for b in labels] for a in labels])
        return (c[same].mean() - c[other].mean()).item()
    before = within_minus_across()
    for _ in range(20):
        opt.zero_grad()
        recipe_contrastive_loss(emb, labels).backward()
        opt.step()
    assert within_minus_across() > before + 0.5


def test_recipe_key_groups_near_identical_styles_and_splits_primitives():
    obj = ObjectSpec("star", "red")
    def scene(style, background="gray"):
        return Scene((obj,), background, style)
    tiles_12, tiles_14 = Style(pixel_cells=12, cell_gaps=True), Style(pixel_cells=14, cell_gaps=True)
    assert recipe_key(scene(tiles_12), "style") == recipe_key(scene(tiles_14), "style")
    assert recipe_key(scene(tiles_12), "style") != recipe_key(scene(Style(pixel_cells=12)), "style")
    assert recipe_key(scene("pixelated"), "style") == recipe_key(scene(Style(pixel_cells=20)), "style")
    assert recipe_key(scene("flat"), "style") != recipe_key(scene("hatched"), "style")
    assert recipe_key(scene("flat", "gray"), "background") != recipe_key(scene("flat", "striped"), "background")
    assert recipe_key(scene("flat"), "objects") != recipe_key(Scene((ObjectSpec("star", "blue"),), "gray", "flat"),
                                                              "objects")


def test_style_balance_draws_rare_styles_more_often():
    obj = ObjectSpec("star", "red")
    scenes = [Scene((obj,), "gray", "flat")] * 90 + [Scene((obj,), "gray", "hatched")] * 10
    uniform, balanced = style_balanced_weights(scenes, 0.0), style_balanced_weights(scenes, 1.0)
    assert np.allclose(uniform, 0.01)
    assert balanced.sum() == pytest.approx(1.0)
    assert balanced[90:].sum() == pytest.approx(0.5) and balanced[:90].sum() == pytest.approx(0.5)
    assert 0.1 < style_balanced_weights(scenes, 0.5)[90:].sum() < 0.5


def test_unknown_tower_is_refused(tokenizer):
    with pytest.raises(ValueError, match="image_tower"):
        build_model(tokenizer, EvaluatorConfig(image_tower="resnet"))


def test_train_saves_a_loadable_evaluator_deterministically_and_resumes(tmp_path, capsys, monkeypatch):
    import cns.world.evaluator as evaluator

    pool = eval_scenes(16, "train", seed=5)  # a rendered pool of 16 scenes instead of 500-scene chunks
    pool_images = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in pool])
    monkeypatch.setattr(evaluator, "build_pool", lambda n, *args, **kwargs: (pool[: n], pool_images[: n]))

    def run(cache):
        return evaluator.train(tmp_path / f"out_{cache}", steps=3, batch_size=8, pool_size=32,
                               cache_dir=tmp_path / cache, config=EvaluatorConfig(image_tower="efficientnet", **SMALL),
                               progress=False, eval_every=0, checkpoint_every=1,
                               tokenizer_path=evaluator.EVALUATOR_PATH)

    images = [render(s, IMAGE_SIZE) for s in eval_scenes(4, "train", seed=3)]
    first = ClipScorer.from_pretrained(str(run("a")), device="cpu")
    assert "resuming" not in capsys.readouterr().out
    # training moved the weights away from the seed's initialisation
    torch.manual_seed(0)
    init = build_model(first.processor.tokenizer, EvaluatorConfig(image_tower="efficientnet", **SMALL)).eval()
    with torch.no_grad():
        init_emb = torch.nn.functional.normalize(projected_features(init.get_image_features(
            pixel_values=first.processor(images=images, return_tensors="pt")["pixel_values"])), dim=-1)
    assert not torch.allclose(first.image_embeddings(images), init_emb, atol=1e-3)
    # the same seed from scratch (a fresh cache) gives the same weights
    second = ClipScorer.from_pretrained(str(run("b")), device="cpu")
    assert torch.allclose(first.image_embeddings(images), second.image_embeddings(images), atol=1e-6)
    # a run stopped after step 2 resumes from its checkpoint and ends with the same weights
    losses = []

    def stop_at_step_3(*args):
        losses.append(None)
        if len(losses) == 3:
            raise KeyboardInterrupt
        return contrastive_loss(*args)

    monkeypatch.setattr(evaluator, "contrastive_loss", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run("c")
    monkeypatch.setattr(evaluator, "contrastive_loss", contrastive_loss)
    resumed = ClipScorer.from_pretrained(str(run("c")), device="cpu")
    assert "resuming from step 2" in capsys.readouterr().out
    assert torch.allclose(first.image_embeddings(images), resumed.image_embeddings(images), atol=1e-6)


def test_train_legible_only_trains_on_legible_scenes(tmp_path, monkeypatch):
    import cns.world.evaluator as evaluator
    from cns.world.render import is_legible, sample_scene

    rng = np.random.default_rng(11)
    pool = [sample_scene(rng, "train", n_objects=1, legible=False) for _ in range(40)]
    legible = [is_legible(s) for s in pool]
    assert 4 <= legible.count(False) and 8 <= legible.count(True)
    pool_images = np.zeros((len(pool), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    monkeypatch.setattr(evaluator, "build_pool", lambda n, *args, **kwargs: (pool[: n], pool_images[: n]))
    seen = []

    def recording_targets(scenes):
        seen.extend(scenes)
        return attribute_targets(scenes)

    monkeypatch.setattr(evaluator, "attribute_targets", recording_targets)

    def run():
        evaluator.train(tmp_path / "out", steps=2, batch_size=8, pool_size=80, cache_dir=tmp_path / "cache",
                        config=EvaluatorConfig(image_tower="efficientnet", **SMALL), progress=False, eval_every=0,
                        tokenizer_path=evaluator.EVALUATOR_PATH, legible_only=True)

    run()
    assert len(seen) == 16 and all(is_legible(s) for s in seen)
    masks = list((tmp_path / "cache").glob("pool_v*/legible_40.npy"))
    assert len(masks) == len(evaluator.POOL_VERSIONS)
    assert np.load(masks[0]).tolist() == legible
    # the cached masks are reused: no scene is checked again
    monkeypatch.setattr(evaluator, "is_legible", lambda scene: pytest.fail("checked again"))
    seen.clear()
    run()
    assert len(seen) == 0  # the finished run is not trained again


def test_train_recipe_loss_sees_style_keys_of_a_style_balanced_draw(tmp_path, monkeypatch):
    import cns.world.evaluator as evaluator

    rng = np.random.default_rng(3)
    flat = [Scene((ObjectSpec(str(rng.choice(["star", "heart", "ring"])), "red"),), "gray", "flat") for _ in range(36)]
    hatched = [Scene((ObjectSpec("star", "blue"),), "gray", "hatched") for _ in range(4)]
    pool = flat + hatched
    pool_images = np.zeros((len(pool), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    monkeypatch.setattr(evaluator, "build_pool", lambda n, *args, **kwargs: (pool[: n], pool_images[: n]))
    calls = []

    def recording_loss(image_emb, keys, temperature):
        calls.append((list(keys), temperature))
        return recipe_contrastive_loss(image_emb, keys, temperature)

    monkeypatch.setattr(evaluator, "recipe_contrastive_loss", recording_loss)
    evaluator.train(tmp_path / "out", steps=4, batch_size=8, pool_size=80, cache_dir=tmp_path / "cache",
                    config=EvaluatorConfig(image_tower="efficientnet", **SMALL), progress=False, eval_every=0,
                    tokenizer_path=evaluator.EVALUATOR_PATH, recipe_weight=0.5, recipe_temperature=0.3,
                    style_balance=1.0)
    assert len(calls) == 4 and all(t == 0.3 and len(keys) == 8 for keys, t in calls)
    hatched_key = recipe_key(hatched[0], "style")
    drawn_hatched = sum(k == hatched_key for keys, _ in calls for k in keys)
    assert drawn_hatched >= 10  # half the draws in expectation (16 of 32); a uniform draw gives about 3
