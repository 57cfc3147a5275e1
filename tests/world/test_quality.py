"""The base-model quality check (cns.world.quality) on the shipped weights, shrunk."""

from __future__ import annotations

import pytest

from cns.world.evaluator import EVALUATOR_PATH
from cns.world.pretrain import DEFAULT_MODEL_PATH

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_PATH / "model_index.json").is_file() or not (EVALUATOR_PATH / "config.json").is_file(),
    reason="tiny-world weights not built",
)


def test_quality_samples_with_the_scheduler_asked_for_and_reports_every_attribute():
    from cns.world.quality import measure_quality

    report = measure_quality(str(DEFAULT_MODEL_PATH), str(EVALUATOR_PATH), n=3, steps=2, two_objects=2,
                             scheduler="EulerDiscreteScheduler")
    assert report["scheduler"] == "EulerDiscreteScheduler"
    assert len(report["_single_images"]) == 3 and report["_single_images"][0].size == (32, 32)
    single = report["single_object"]
    assert set(single) == {"shape", "color", "background", "style", "mean"}
    assert all(0.0 <= v <= 1.0 for v in single.values())
    assert single["mean"] == pytest.approx(sum(single[a] for a in ("shape", "color", "background", "style")) / 4)
    assert set(report["two_objects"]) == {"background", "style", "both_shapes"}
    # the evaluator reads the true renders of the same prompts well: the instrument works
    assert report["reference_renders"]["background"] >= 2 / 3
    assert report["vae"]["concepts"] == 16
    for ceiling in ("reference_at_model_size", "reference_through_vae"):
        assert set(report[ceiling]) == {"shape", "color", "background", "style"}
        assert report[ceiling]["background"] >= 2 / 3

    default = measure_quality(str(DEFAULT_MODEL_PATH), str(EVALUATOR_PATH), n=1, steps=2, two_objects=0,
                              vae=False)
    assert default["scheduler"] == "DDIMScheduler" and "two_objects" not in default
    assert "vae" not in default and "reference_through_vae" not in default


class _DimmingVAE:
    """A stand-in VAE whose round trip scales pixels by 0.9: its error is 1% of each image's energy."""

    class config:
        sample_size = 32

    def encode(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=0.9 * x))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z)


def test_the_vae_check_compares_each_concept_with_the_world_at_the_models_size():
    from cns.world.concepts import CONCEPTS
    from cns.world.quality import vae_check

    report = vae_check(_DimmingVAE(), n=8)
    assert set(report["concept_mse"]) == {c.name for c in CONCEPTS} and report["concepts"] == len(CONCEPTS)
    world = report["world_mse"]
    assert world > 0
    for name, error in report["concept_mse"].items():
        assert report["concept_mse_ratio"][name] == pytest.approx(error / world, rel=1e-2)  # figures rounded to 5 decimals
    assert report["within_2x"] == sum(r <= 2 for r in report["concept_mse_ratio"].values())
    # dark scenes (the navy backgrounds) lose less energy than the pale world: the check tells them apart
    assert len(set(report["concept_mse_ratio"].values())) > 1
    spread = report["world_mse_spread"]
    assert spread["median"] <= spread["p90"] <= spread["p99"] <= spread["max"] and world <= spread["max"]
    # a concept's percentile among the world's per-image errors rises with its error, and it is
    # 100 exactly for the concepts above every world image
    percentile = report["concept_world_percentile"]
    by_error = sorted(report["concept_mse"], key=report["concept_mse"].get)
    assert [percentile[name] for name in by_error] == sorted(percentile.values())
    assert all(0 <= p <= 100 for p in percentile.values()) and len(set(percentile.values())) > 1
    assert report["above_world_max"] == sum(report["concept_mse"][n] > spread["max"] for n in percentile)
    assert report["above_world_max"] == sum(p == 100 for p in percentile.values())
    assert 0 < report["world_within_2x"] <= 1
    assert (report["world_within_2x"] == 1) == (spread["max"] <= 2 * world)


def test_vae_reconstruction_errors_are_each_images_own_mse():
    import numpy as np

    from cns.world.pretrain import vae_reconstruction_errors, vae_reconstruction_mse

    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    images[2] = 127  # mid grey, about 0 in [-1, 1]: almost no error under the dimming round trip
    errors = vae_reconstruction_errors(_DimmingVAE(), images, batch=2)
    pixels = images / 127.5 - 1
    expected = ((0.1 * pixels) ** 2).reshape(5, -1).mean(1)  # x - 0.9 x
    assert errors == pytest.approx(expected, rel=1e-5)
    assert errors[2] < 1e-4 < errors.min(where=np.arange(5) != 2, initial=1)
    assert vae_reconstruction_mse(_DimmingVAE(), images) == pytest.approx(expected.mean(), rel=1e-5)
