"""Pretraining pieces: the tokenizer covers the world, checkpoints resume exactly (no pickle)."""

import numpy as np
import pytest
import torch
from torch import nn

from cns.world.checkpoints import load_checkpoint, read_checkpoint_info, save_checkpoint
from cns.world.pretrain import DEFAULT_MODEL_PATH, TinyWorldConfig, _lr, build_components, build_tokenizer
from cns.world.render import vocabulary_words
from cns.world.tokenizer import build_clip_tokenizer, train_bpe


def test_every_world_word_is_one_token():
    tokenizer = build_tokenizer()
    for word in vocabulary_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a big red star on the left, on a striped background, outline style").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 17  # 13 words, 2 commas


def test_bpe_merges_break_ties_by_string_order_whatever_the_word_order():
    words = ["star", "stripe", "ring", "rings", "tar"]
    merges = train_bpe(words)
    assert train_bpe(list(reversed(words))) == merges
    assert merges[0] == ("r", "i")  # 3 times: stripe, ring, rings
    assert merges[1] == ("a", "r</w>")  # the smallest of the pairs seen twice
    tokenizer = build_clip_tokenizer(list(reversed(words)))
    assert tokenizer.get_vocab() == build_clip_tokenizer(words).get_vocab()
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_the_shipped_tokenizer_is_the_one_pretraining_builds():
    """Ids must not depend on the run: the shipped text encoder reads them (the BPE library's
    hash-ordered ties once gave every build different ids)."""
    import json

    from transformers import CLIPTokenizer

    shipped = CLIPTokenizer.from_pretrained(DEFAULT_MODEL_PATH / "tokenizer")
    built = build_tokenizer(shipped.model_max_length)
    assert built.get_vocab() == shipped.get_vocab()
    merges = [json.loads(t.backend_tokenizer.to_str())["model"]["merges"] for t in (built, shipped)]
    assert merges[0] == merges[1]


def test_components_are_a_stable_diffusion_layout():
    config = TinyWorldConfig()
    vae, text_encoder, unet, scheduler = build_components(config, build_tokenizer())
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == config.image_size
    assert unet.config.in_channels == vae.config.latent_channels
    assert scheduler.config.clip_sample is False  # clipping latents to [-1, 1] turns samples to noise
    assert float(scheduler.alphas_cumprod[-1]) > 0 and scheduler.config.prediction_type == "epsilon"  # SD's, shipped


def test_the_zero_snr_option_ends_the_schedule_where_sampling_starts():
    """At t = T no trace of the image is left, so nothing but the prompt can set a background's colour
    (on 16x16 latents an epsilon model on SD's schedule read it from the starting noise)."""
    from diffusers import DDPMScheduler

    config = TinyWorldConfig(zero_terminal_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    *_, scheduler = build_components(config, build_tokenizer())
    training = DDPMScheduler.from_config(scheduler.config)
    assert float(training.alphas_cumprod[-1]) == 0.0 and float(training.alphas_cumprod[0]) > 0.99
    assert training.config.prediction_type == "v_prediction"  # epsilon is undefined where the signal is gone
    scheduler.set_timesteps(30)
    assert int(scheduler.timesteps[0]) == training.config.num_train_timesteps - 1


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_the_snr_shift_divides_every_steps_snr_and_survives_a_save(tmp_path, zero_terminal_snr):
    """Hoogeboom et al. 2023: a shift of 4 gives 16x16 latents the coarse-content SNR that 8x8 latents have."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from cns.world.pretrain import snr_shifted_betas

    snr = lambda alphas_bar: alphas_bar / (1 - alphas_bar)  # noqa: E731
    plain = dict(zero_terminal_snr=zero_terminal_snr, prediction_type="v_prediction" if zero_terminal_snr else "epsilon")
    *_, unshifted = build_components(TinyWorldConfig(**plain), build_tokenizer())
    *_, shifted = build_components(TinyWorldConfig(snr_shift=4.0, **plain), build_tokenizer())
    shifted.save_pretrained(tmp_path)
    reloaded = DDPMScheduler.from_config(DDIMScheduler.from_pretrained(tmp_path).config)  # as training and CNS load it
    before, after = unshifted.alphas_cumprod.double(), reloaded.alphas_cumprod.double()
    inner = slice(0, -1)  # (with zero terminal SNR, the last step's SNR is 0 in both)
    assert torch.allclose(snr(before[inner]) / snr(after[inner]), torch.full_like(before[inner], 4.0), rtol=1e-3)
    expected_end = 0.0 if zero_terminal_snr else float(before[-1]) / (4 - 3 * float(before[-1]))
    assert float(after[-1]) == pytest.approx(expected_end, rel=1e-3, abs=1e-12)
    assert reloaded.config.prediction_type == plain["prediction_type"]
    assert torch.allclose(snr_shifted_betas(unshifted.betas, 1.0), unshifted.betas, rtol=1e-5, atol=1e-8)
    assert unshifted.config.trained_betas is None  # the shipped schedule stays SD's, by name


def test_cross_attention_sits_on_the_levels_the_config_names():
    config = TinyWorldConfig(unet_channels=(32, 64, 128, 128), unet_attention_levels=(1, 2))
    _, _, unet, _ = build_components(config, build_tokenizer())
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    cross = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert cross and not any(name.startswith(("down_blocks.0.", "down_blocks.3.", "up_blocks.0.", "up_blocks.3."))
                             for name in cross)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_the_vae_pool_adds_a_pool_of_unnamed_recipes_only_when_asked(tmp_path, monkeypatch, share):
    import cns.world.dataset as dataset
    from cns.world.pretrain import vae_pool

    calls = []

    def fake_render_pool(n, seed, split, size, cache_dir, **kwargs):
        calls.append(kwargs)
        return [None] * n, np.full((n, size, size, 3), 200, np.uint8)

    monkeypatch.setattr(dataset, "render_pool", fake_render_pool)
    config = TinyWorldConfig(pool_size=3, render_size=8, image_size=4, vae_novel=share)
    base = np.zeros((3, 4, 4, 3), np.uint8)
    pool = vae_pool(base, config, tmp_path, workers=1, progress=False)
    if not share:
        assert pool is base and not calls
        return
    assert [(c["novel_background"], c["novel_style"]) for c in calls] == [(share, share)]
    assert pool.shape == (6, 4, 4, 3)
    assert (pool[:3] == 0).all() and (pool[3:] == 200).all()  # the UNet's pool first, resized novel scenes after


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _step(model, optimizer, seed):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    straight, opt = _model_and_optimizer(0)
    for s in range(4):
        _step(straight, opt, s)

    first, opt1 = _model_and_optimizer(0)
    for s in range(2):
        _step(first, opt1, s)
    save_checkpoint(tmp_path, "ckpt", {"m": first}, opt1, step=2)
    resumed, opt2 = _model_and_optimizer(123)  # different init: everything must come from the file
    assert load_checkpoint(tmp_path, "ckpt", {"m": resumed}, opt2) == 2
    for s in range(2, 4):
        _step(resumed, opt2, s)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path, "missing", {"m": resumed}, opt2) == 0
    assert not any(p.suffix == ".pt" or p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_checkpoint_without_its_json_is_incomplete_and_ignored(tmp_path):
    model, opt = _model_and_optimizer(0)
    _step(model, opt, 0)
    save_checkpoint(tmp_path, "ckpt", {"m": model}, opt, step=1, extra={"meta": {"lr": 0.1}})
    assert read_checkpoint_info(tmp_path, "ckpt") == {"step": 1, "meta": {"lr": 0.1}}
    (tmp_path / "ckpt.json").unlink()  # killed between the two files
    fresh, opt2 = _model_and_optimizer(5)
    before = [p.clone() for p in fresh.parameters()]
    assert read_checkpoint_info(tmp_path, "ckpt") is None
    assert load_checkpoint(tmp_path, "ckpt", {"m": fresh}, opt2) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert _lr(0, 100, 1.0, 10) == 0.1
    assert _lr(9, 100, 1.0, 10) == 1.0
    assert abs(_lr(100, 100, 1.0, 10) - 0.1) < 1e-9
    assert _lr(50, 100, 1.0, 10) < _lr(20, 100, 1.0, 10)


def test_vae_round_trip_returns_images_of_the_input_shape_near_the_input():
    import numpy as np

    from cns.world.pretrain import vae_reconstruction_mse, vae_round_trip

    torch.manual_seed(0)
    vae, _, _, _ = build_components(TinyWorldConfig(), build_tokenizer())
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    out = vae_round_trip(vae, images, batch=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    # the same decode(mean(encode(x))) the MSE check measures, up to uint8 rounding
    mse = float(((out.astype(np.float64) / 127.5 - 1) - (images / 127.5 - 1)).__pow__(2).mean())
    assert abs(mse - vae_reconstruction_mse(vae, images)) < 0.01


@pytest.mark.parametrize("stage", ["decoder", "decoder_refine", "appearance"])
def test_decoder_stages_keep_the_latent_space_and_lower_reconstruction_error(tmp_path, stage):
    import numpy as np

    from cns.world.pretrain import (encode_pool, finetune_decoder, finetune_decoder_appearance, refine_decoder,
                                    vae_reconstruction_mse)

    config = TinyWorldConfig(vae_channels=(8, 16), vae_batch=4, decoder_steps=30, decoder_lr=3e-3, warmup=1,
                             refine_steps=30, refine_lr=3e-3, appearance_steps=30, appearance_lr=3e-3)
    config.extra["checkpoint_every"] = 1000
    vae, _, _, _ = build_components(config, build_tokenizer())
    rng = np.random.default_rng(0)
    images = np.zeros((8, 16, 16, 3), dtype=np.uint8)  # plain colours: learnable in a few steps
    images[:] = rng.integers(0, 256, size=(8, 1, 1, 3), dtype=np.uint8)
    latents_before = encode_pool(vae, images)[0]
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    error_before = vae_reconstruction_mse(vae, images)

    run = {"decoder": finetune_decoder, "decoder_refine": refine_decoder, "appearance": finetune_decoder_appearance}[stage]
    report = run(vae, images, config, tmp_path, progress=False)

    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert torch.allclose(encode_pool(vae, images)[0], latents_before, atol=1e-6)  # a UNet trained on these latents stays valid
    assert vae_reconstruction_mse(vae, images) < 0.85 * error_before  # measured: 0.74x after 30 steps
    assert report["mse_last50"] is not None and not any(p.requires_grad for p in vae.parameters())
    assert (tmp_path / f"{stage}.json").exists()  # the last step is checkpointed: a rerun resumes at the end
    assert {p.name for p in tmp_path.glob("*.json")} == {f"{stage}.json"}  # each stage resumes from its own


def test_default_settings_build_the_shipped_architecture():
    """`cns world pretrain` with no flags must compute the shipped model: same layout, same sizes."""
    import json

    from safetensors.torch import load_file

    from cns.world.pretrain import DEFAULT_MODEL_PATH

    vae, text_encoder, unet, _ = build_components(TinyWorldConfig(), build_tokenizer())
    for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        shipped = json.loads((DEFAULT_MODEL_PATH / name / "config.json").read_text())
        built = json.loads(json.dumps(dict(module.config) if name != "text_encoder" else module.config.to_dict()))
        architecture = ("block_out_channels", "latent_channels", "layers_per_block", "cross_attention_dim",
                        "down_block_types", "up_block_types",
                        "attention_head_dim", "sample_size", "hidden_size", "num_hidden_layers",
                        "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings")
        keys = [k for k in architecture if k in shipped]
        assert len(keys) >= 4, name
        assert {k: built[k] for k in keys} == {k: shipped[k] for k in keys}, name
        weights = next((DEFAULT_MODEL_PATH / name).glob("*.safetensors"))
        stored = load_file(weights)
        assert {k: tuple(v.shape) for k, v in stored.items()} == {k: tuple(v.shape) for k, v in module.state_dict().items()
                                                                 if k in stored}, name
        assert sum(v.numel() for v in stored.values()) == sum(p.numel() for p in module.parameters()), name


def test_min_snr_weights_cap_the_low_noise_steps_only():
    from diffusers import DDPMScheduler

    from cns.world.pretrain import min_snr_weights

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 100, 500, 999])
    assert torch.equal(min_snr_weights(scheduler, t, 0.0), torch.ones(4))  # off: the shipped plain MSE
    w = min_snr_weights(scheduler, t, 5.0)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    assert torch.allclose(w, torch.where(snr > 5, 5 / snr, torch.ones(4)))
    assert w[0] < 0.01 and w[-1] == 1.0 and torch.all(w[:-1] <= w[1:])  # nearly clean steps weigh least


def test_min_snr_weights_on_the_v_mse_weigh_the_x0_error_by_the_capped_snr():
    """Hang et al. 2023 in x0 terms; with v = a eps - s x0, ||x0 - x0_hat||^2 = s^2 ||v - v_hat||^2."""
    from diffusers import DDPMScheduler

    from cns.world.pretrain import min_snr_weights

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", rescale_betas_zero_snr=True)
    t = torch.tensor([0, 100, 500, 999])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    v_hat = scheduler.get_velocity(x0, noise, t) + 0.3 * torch.randn(x0.shape, generator=g)
    x_t = scheduler.add_noise(x0, noise, t)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    per_sample = lambda e: e.pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    weighted_v = min_snr_weights(scheduler, t, 5.0) * per_sample(v_hat - scheduler.get_velocity(x0, noise, t))
    assert torch.allclose(weighted_v, torch.clamp(snr, max=5.0) * per_sample(a * x_t - s * v_hat - x0), atol=1e-5)
    assert torch.isfinite(weighted_v).all() and weighted_v[-1] == 0  # zero SNR: no x0 signal to weigh


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_x0_share_weights_make_the_loss_epsilon_error_plus_a_share_of_the_x0_error(prediction_type):
    from diffusers import DDPMScheduler

    from cns.training import diffusion_target
    from cns.world.pretrain import x0_share_weights

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, rescale_betas_zero_snr=prediction_type == "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 10, 400, 900, 999 if prediction_type == "v_prediction" else 998])
    x_t = scheduler.add_noise(x0, noise, t)
    target = diffusion_target(scheduler, x0, noise, t)
    prediction = target + 0.3 * torch.randn(x0.shape, generator=g)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":  # Salimans & Ho 2022: eps = s x_t + a v, x0 = a x_t - s v
        eps_hat, x0_hat = s * x_t + a * prediction, a * x_t - s * prediction
    else:
        eps_hat, x0_hat = prediction, (x_t - s * prediction) / a
    per_sample = lambda e: e.pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    target_mse = per_sample(prediction - target)
    for share in (0.0, 0.2, 1.0):
        expected = per_sample(eps_hat - noise) + share * per_sample(x0_hat - x0)
        assert torch.allclose(x0_share_weights(scheduler, t, share) * target_mse, expected, rtol=1e-4, atol=1e-6)
    own = 1.0 if prediction_type == "v_prediction" else 0.0  # each prediction type's own MSE is one of the family
    assert torch.allclose(x0_share_weights(scheduler, t, own), torch.ones(5))
    if prediction_type == "v_prediction":  # zero terminal SNR: the last step keeps exactly the x0 share
        assert x0_share_weights(scheduler, t, 0.2)[-1] == pytest.approx(0.2)


def test_the_config_refuses_two_loss_weightings_and_a_shift_that_is_not_positive():
    with pytest.raises(ValueError, match="choose one"):
        TinyWorldConfig(snr_gamma=5.0, x0_loss_weight=0.2)
    with pytest.raises(ValueError, match="positive"):
        TinyWorldConfig(snr_shift=0.0)
    assert TinyWorldConfig(x0_loss_weight=0.0).snr_gamma == 0.0  # one weighting alone is fine


def test_the_command_line_sets_every_setting_including_tuples_and_switches(monkeypatch):
    import cns.world.pretrain as pretrain

    seen = {}

    def fake_pretrain(work, out, config, workers):
        seen["config"] = config
        return {}

    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    pretrain.main(["--vae-channels", "32,64", "--unet-channels", "32,64,128,128", "--unet-attention-levels", "1,2",
                   "--vae-novel", "0.5", "--zero-terminal-snr", "--prediction-type", "v_prediction",
                   "--x0-loss-weight", "0.2", "--snr-shift", "4"])
    config = seen["config"]
    assert config.x0_loss_weight == 0.2 and config.snr_shift == 4.0
    assert config.vae_channels == (32, 64) and config.unet_channels == (32, 64, 128, 128)
    assert config.unet_attention_levels == (1, 2) and config.vae_novel == 0.5
    assert config.zero_terminal_snr is True and config.prediction_type == "v_prediction"
    assert config.timestep_spacing == TinyWorldConfig().timestep_spacing  # untouched settings keep their defaults
