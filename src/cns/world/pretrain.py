"""Pretraining of the tiny world's text-to-image model: a real diffusers
``StableDiffusionPipeline`` (CLIP tokenizer and text encoder, ``AutoencoderKL``,
``UNet2DConditionModel`` with cross-attention, DDIM sampler), small enough for 2 CPU cores.

    python -m cns.world.pretrain --work world-pretrain --out src/cns/world/weights/tiny-world

Stages, all resumable from the work folder (checkpoints every ``--checkpoint-every``
steps, safetensors + JSON only): the VAE on rendered scenes; its decoder alone, with the
encoder (the latent space) frozen from here on, then once more at a lower learning rate (the
refine stage); the decoder again on a second pool that holds unnamed style and background
recipes (the appearance stage, off by default); then the UNet and the text encoder together
on the VAE's latents, with classifier-free-guidance caption dropout and
captions whose attributes are left out at random (:func:`cns.world.dataset.training_caption`).
Every random draw comes from a generator seeded by (seed, stage, step), so a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import load_checkpoint, save_checkpoint

__all__ = ["TinyWorldConfig", "build_tokenizer", "build_components", "finetune_decoder",
           "refine_decoder", "finetune_decoder_appearance", "pretrain", "DEFAULT_MODEL_PATH"]

DEFAULT_MODEL_PATH = Path(__file__).with_name("weights") / "tiny-world"
EXTRA_WORDS = ("photo", "of", ",", "<|endoftext|>")


@dataclass
class TinyWorldConfig:
    image_size: int = 32  # measured: a 64 px world needs a VAE too slow to train on 2 cores (see docs)
    render_size: int = 64  # scenes are rendered at 64 px and downsampled (anti-aliased)
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 2 downsamplings: 32 px -> 8x8 latents; (32, 64) gives f = 2,
    # 16x16 latents that keep the concepts' 1 px dots and stripes (measured, not shipped: docs/world/pretraining.md)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)  # for 16x16 latents: (32, 64, 128, 128), attention levels (1, 2)
    unet_attention_levels: tuple[int, ...] = (0, 1)  # the levels with cross-attention (the last has none)
    unet_heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 32
    pool_size: int = 16000
    novel_background: float = 0.0  # share of pool scenes on an unnamed background recipe (cns.world.recipes)
    novel_style: float = 0.0  # ... in an unnamed style recipe: the primitives concepts are made of
    vae_novel: float = 0.0  # > 0: the VAE stages also see a second pool of pool_size scenes, this share of them on an
    # unnamed background and this share in an unnamed style (cns.world.recipes); the UNet never sees it
    legible: bool = False  # True: only scenes whose render shows their caption (is_legible); measured, not better (docs)
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_crop: int = 0  # > 0: train the (fully convolutional) VAE on random crops of this size
    vae_lr: float = 1.5e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 2000  # decoder alone, encoder frozen: attribute ceiling 0.812 -> 0.848 (docs/world/quality.md)
    decoder_lr: float = 1e-3
    refine_steps: int = 2000  # the decoder alone once more, at a lower lr: ceiling 0.800 -> 0.810 (docs)
    refine_lr: float = 5e-4
    appearance_steps: int = 0  # > 0: the decoder alone on a pool with unnamed recipes (measured, not shipped: docs)
    appearance_lr: float = 5e-4
    appearance_novel: float = 0.2  # share of that pool's scenes on an unnamed background, and in an unnamed style
    unet_steps: int = 9000  # the shipped run (3,000 at lr 5e-4 drew shapes too rarely, 6,000 reached 0.760: docs/world/pretraining.md)
    unet_batch: int = 32
    unet_lr: float = 7e-4
    # Stable Diffusion's schedule (shipped). It leaves 6.9% of the signal at t = T; over 16x16x4 latents the image's
    # mean then outweighs the noise's, and an epsilon model read each background's colour from the starting noise.
    # Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"): --zero-terminal-snr
    # --prediction-type v_prediction --timestep-spacing trailing (measured, not shipped: docs/world/pretraining.md).
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    # > 1: divide the schedule's SNR at every step by this (log-SNR shifted by -log(snr_shift)), stored as the
    # scheduler's trained_betas. Hoogeboom et al. 2023 ("simple diffusion") shift by the square of the resolution
    # ratio: 4 gives 16x16 latents the low-frequency SNR that SD's schedule gives 8x8 ones (sqrt(alpha_bar_T)
    # 0.068 -> 0.034), where epsilon models drew backgrounds from the prompt. Measured: it did not make an f = 2
    # epsilon model do so (docs/world/pretraining.md); --x0-loss-weight did.
    snr_shift: float = 1.0
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weights (Hang et al. 2023); 0 = plain MSE, as shipped
    # The loss as ||eps - eps_hat||^2 + x0_loss_weight * ||x0 - x0_hat||^2, whatever the model predicts. None: the
    # prediction type's own MSE (epsilon: 0; v-prediction: 1, since the v error is the sum of the two). Zero-SNR v with
    # 0.2: shapes 0.940, but styles drawn flat, mean 0.785. Epsilon on SD's schedule with 0.2: backgrounds from the
    # prompt, styles kept, mean 0.831 / 0.840 (measured, not shipped yet: docs/world/pretraining.md).
    x0_loss_weight: float | None = None
    caption_dropout: float = 0.1  # empty caption: classifier-free guidance
    attribute_drop: float = 0.15
    ema_decay: float = 0.999
    warmup: int = 200
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.x0_loss_weight is not None and self.snr_gamma:
            raise ValueError("x0_loss_weight and snr_gamma each set the loss weights: choose one")
        if self.snr_shift <= 0:
            raise ValueError(f"snr_shift must be positive, not {self.snr_shift}")


def build_tokenizer(max_length: int = 32):
    from .render import vocabulary_words
    from .tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(list(vocabulary_words()) + [w for w in EXTRA_WORDS if not w.startswith("<")],
                                model_max_length=max_length)


def build_components(config: TinyWorldConfig, tokenizer):
    """Fresh (random) VAE, text encoder, UNet and sampler of the tiny world's model."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=config.image_size, mid_block_add_attention=False,  # no attention: crops generalise
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    attention = [i in config.unet_attention_levels for i in range(len(config.unet_channels))]
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (levels - 1),
        in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.unet_channels, layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=config.text_width, attention_head_dim=config.unet_heads, norm_num_groups=32,
    )
    schedule = dict(beta_start=config.beta_start, beta_end=config.beta_end, beta_schedule=config.beta_schedule)
    shifted = None
    if config.snr_shift != 1.0:
        betas = DDIMScheduler(**schedule, rescale_betas_zero_snr=config.zero_terminal_snr).betas  # (a zero SNR stays 0)
        shifted = snr_shifted_betas(betas, config.snr_shift).tolist()
    scheduler = DDIMScheduler(**schedule, trained_betas=shifted, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=config.prediction_type,
                              rescale_betas_zero_snr=config.zero_terminal_snr, timestep_spacing=config.timestep_spacing)
    return vae, text_encoder, unet, scheduler


def snr_shifted_betas(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """Betas whose SNR at every step is the SNR of ``betas`` divided by ``shift``.

    SNR_t = alpha_bar_t / (1 - alpha_bar_t); a shift of s keeps alpha_bar'_t = alpha_bar_t / (s - (s - 1) alpha_bar_t)
    (Hoogeboom et al. 2023, "simple diffusion", Sec. 3.1: log-SNR shifted by -2 log(d / 64) for d-pixel images;
    Esser et al. 2024, SD3, Sec. 5.3.2). Averaging n x n pixels of the noise leaves it 1 / n of its deviation, so an
    image's coarse content is that much less hidden than its pixels; at twice the resolution a shift of 4 hides it
    as well as before."""
    alphas_bar = torch.cumprod(1.0 - betas.double(), dim=0)
    shifted = alphas_bar / (shift - (shift - 1.0) * alphas_bar)
    previous = torch.cat([shifted.new_ones(1), shifted[:-1]])
    return (1.0 - shifted / previous).to(betas.dtype)


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (n, h, w, 3) resized to ``size`` (Lanczos), as the pipeline will see them."""
    if images.shape[1] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------ stages


def _train_reconstruction(vae, params, images: np.ndarray, config: TinyWorldConfig, work: Path, *, name: str,
                          stage: int, steps: int, lr: float, encoder_frozen: bool, progress: bool) -> dict:
    """The VAE's reconstruction loop (MSE + L1, checkpointed as ``name``), shared by `train_vae`
    and `finetune_decoder`. With ``encoder_frozen`` the encoder runs without gradients and the
    KL term, which only the encoder feels, is left out; otherwise random crops (``vae_crop``)
    and the KL term apply."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(params, lr=lr)
    start = load_checkpoint(work, name, {"vae": vae}, optimizer)
    vae.eval() if encoder_frozen else vae.train()  # no dropout or batch statistics: the mode is a label only
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="VAE decoder" if encoder_frozen else "VAE",
               disable=not progress, dynamic_ncols=True)
    recent = []
    for step in bar:
        g = _generator(config.seed, stage, step)
        batch = _to_pixels(images[torch.randint(len(images), (config.vae_batch,), generator=g).numpy()])
        if not encoder_frozen and config.vae_crop and config.vae_crop < batch.shape[-1]:
            top, left = torch.randint(batch.shape[-1] - config.vae_crop + 1, (2,), generator=g).tolist()
            batch = batch[..., top:top + config.vae_crop, left:left + config.vae_crop]
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, config.warmup)
        with torch.set_grad_enabled(not encoder_frozen):
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + F.l1_loss(recon, batch)
        if not encoder_frozen:
            loss = loss + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [mse.item()])[-50:]
        bar.set_postfix(mse=f"{sum(recent) / len(recent):.4f}")
        if (step + 1) % config.extra.get("checkpoint_every", 250) == 0 or step + 1 == steps:
            save_checkpoint(work, name, {"vae": vae}, optimizer, step + 1, {"mse": sum(recent) / len(recent)})
    vae.eval()
    return {"mse_last50": sum(recent) / len(recent) if recent else None}


def train_vae(vae, images: np.ndarray, config: TinyWorldConfig, work: Path, progress=True) -> dict:
    """Stage 1: the whole VAE, MSE + L1 + a small KL term."""
    return _train_reconstruction(vae, vae.parameters(), images, config, work, name="vae", stage=1,
                                 steps=config.vae_steps, lr=config.vae_lr, encoder_frozen=False, progress=progress)


def finetune_decoder(vae, images: np.ndarray, config: TinyWorldConfig, work: Path, progress=True, *,
                     name: str = "decoder", stage: int = 3, steps: int | None = None,
                     lr: float | None = None) -> dict:
    """Stage 2: the VAE's decoder (and ``post_quant_conv``) alone, the encoder frozen.

    The latent space stays what it is, so a UNet trained on it stays valid; only how latents are
    drawn improves (as Stable Diffusion's ``ft-MSE`` VAE fine-tuned its decoder). Same loss as
    `train_vae` without the KL term, which does not involve the decoder. ``name``, ``stage``,
    ``steps`` and ``lr`` (default: the decoder stage's) serve `finetune_decoder_appearance`."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    report = _train_reconstruction(vae, params, images, config, work, name=name, stage=stage,
                                   steps=config.decoder_steps if steps is None else steps,
                                   lr=config.decoder_lr if lr is None else lr, encoder_frozen=True,
                                   progress=progress)
    vae.requires_grad_(False)
    return report


def finetune_decoder_appearance(vae, images: np.ndarray, config: TinyWorldConfig, work: Path,
                                progress=True) -> dict:
    """Stage 3: the decoder alone again, on a second pool in which a share of the scenes
    (``appearance_novel``) have unnamed style and background recipes (`cns.world.recipes`): the
    high-contrast stripes, checks and motif fields, halftone and crosshatch fills that personal
    concepts are made of. The encoder stays frozen, so the latents and the UNet do not change;
    the decoder learns to draw those primitives from them (on the shipped VAE, harbor-stripes'
    reconstruction error fell from 31.8x the world's to 10.0x, docs/world/pretraining.md)."""
    return finetune_decoder(vae, images, config, work, progress, name="appearance", stage=4,
                            steps=config.appearance_steps, lr=config.appearance_lr)


def refine_decoder(vae, images: np.ndarray, config: TinyWorldConfig, work: Path, progress=True) -> dict:
    """Stage 2b: the decoder stage once more, from its end, on the same pool: a fresh warm-up and
    cosine schedule at ``refine_lr`` (a restart, as Stable Diffusion's VAE decoder was fine-tuned
    twice). On the shipped model it lifted held-out attribute accuracy from 0.799 / 0.796 to
    0.811 / 0.818 with the same UNet (docs/world/pretraining.md)."""
    return finetune_decoder(vae, images, config, work, progress, name="decoder_refine", stage=5,
                            steps=config.refine_steps, lr=config.refine_lr)


@torch.no_grad()
def vae_reconstruction_errors(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Each image's mean squared error (pixels in [-1, 1]) of decode(mean of encode(x))."""
    errors = []
    for start in range(0, len(images), batch):
        x = _to_pixels(images[start:start + batch])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        errors.append((y - x).double().pow(2).flatten(1).mean(1).numpy())
    return np.concatenate(errors)


def vae_reconstruction_mse(vae, images: np.ndarray, batch: int = 64) -> float:
    """Mean squared error (pixels in [-1, 1]) of decode(mean of encode(x)) over all images."""
    return float(vae_reconstruction_errors(vae, images, batch).mean())


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 images (n, h, w, 3) after decode(mean of encode(x)): the best a latent model can draw them."""
    out = []
    for start in range(0, len(images), batch):
        x = vae.decode(vae.encode(_to_pixels(images[start:start + batch])).latent_dist.mean).sample
        out.append(x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(_to_pixels(images[start:start + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights on the MSE of the scheduler's prediction type that make the loss
    min(SNR(t), gamma) * ||x0 - x0_hat||^2 (Min-SNR-gamma, Hang et al. 2023, Eq. 9): min(SNR, gamma) / SNR on the
    epsilon MSE, min(SNR, gamma) / (SNR + 1) on the v MSE (finite at zero terminal SNR); all ones when ``gamma`` is 0."""
    if not gamma:
        return torch.ones(timesteps.shape)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return _on_prediction_mse(noise_scheduler, snr, torch.clamp(snr, max=gamma), "snr_gamma")


def x0_share_weights(noise_scheduler, timesteps: torch.Tensor, x0_weight: float) -> torch.Tensor:
    """Per-sample weights on the MSE of the scheduler's prediction type that make the loss
    ||eps - eps_hat||^2 + x0_weight * ||x0 - x0_hat||^2.

    With x_t = a x0 + s eps and v = a eps - s x0 (Salimans & Ho 2022, Sec. 4): eps - eps_hat = a (v - v_hat) and
    x0 - x0_hat = -s (v - v_hat), so the loss is (SNR + x0_weight) / (SNR + 1) times the v MSE, or (SNR + x0_weight)
    / SNR times the epsilon MSE. x0_weight = 1 is plain v MSE, 0 plain epsilon MSE; with 0, a zero-terminal-SNR
    schedule's last step (Lin et al. 2024), the one that sets each image's colours, has no weight at all."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return _on_prediction_mse(noise_scheduler, snr, snr + x0_weight, "x0_loss_weight")


def _on_prediction_mse(noise_scheduler, snr: torch.Tensor, x0_error_weight: torch.Tensor, setting: str) -> torch.Tensor:
    """Weights on the MSE of the scheduler's prediction type that weigh ||x0 - x0_hat||^2 by ``x0_error_weight``:
    that error is the epsilon MSE / SNR and the v MSE / (SNR + 1) (Salimans & Ho 2022, Sec. 4)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return x0_error_weight / (snr + 1)
    if prediction_type != "epsilon":
        raise ValueError(f"{setting} needs epsilon or v-prediction, not {prediction_type}")
    return x0_error_weight / snr


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, scenes, config: TinyWorldConfig, work: Path,
               progress=True) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from ..model import pipeline_tokens
    from ..training import diffusion_target
    from .dataset import training_caption

    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    means, stds = latents
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    ema_path = work / "unet_ema.safetensors"
    start = load_checkpoint(work, "unet", {"unet": unet, "text_encoder": text_encoder}, optimizer)
    if start and ema_path.exists():
        from safetensors.torch import load_file

        stored = load_file(ema_path)
        ema.shadow_params = [stored[f"{i}"] for i in range(len(stored))]
        ema.optimization_step = start
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, config.unet_steps), initial=start, total=config.unet_steps, desc="UNet + text encoder",
               disable=not progress, dynamic_ncols=True)
    recent = []
    for step in bar:
        g = _generator(config.seed, 2, step)
        pick = torch.randint(len(means), (config.unet_batch,), generator=g)
        rng = np.random.default_rng([config.seed, 2, step])
        captions = [
            "" if rng.random() < config.caption_dropout else training_caption(scenes[i], rng, config.attribute_drop)
            for i in pick.tolist()
        ]
        x = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=g)) * config.extra["scaling_factor"]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (x.shape[0],), generator=g)
        ids = pipeline_tokens(tokenizer, captions).input_ids
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.unet_steps, config.unet_lr, config.warmup)
        prediction = unet(noise_scheduler.add_noise(x, noise, t), t, text_encoder(ids)[0]).sample
        target = diffusion_target(noise_scheduler, x, noise, t)
        if config.x0_loss_weight is not None:  # (the config refuses both at once)
            weights = x0_share_weights(noise_scheduler, t, config.x0_loss_weight)
        elif config.snr_gamma:
            weights = min_snr_weights(noise_scheduler, t, config.snr_gamma)
        else:  # the shipped run's loss, computed exactly as it was
            weights = None
        if weights is None:
            loss = F.mse_loss(prediction, target)
        else:
            loss = (F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        recent = (recent + [float(loss)])[-100:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if (step + 1) % config.extra.get("checkpoint_every", 250) == 0 or step + 1 == config.unet_steps:
            from safetensors.torch import save_file

            save_file({f"{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)}, work / ".unet_ema.tmp")
            os.replace(work / ".unet_ema.tmp", ema_path)
            save_checkpoint(work, "unet", {"unet": unet, "text_encoder": text_encoder}, optimizer, step + 1,
                             {"loss": sum(recent) / len(recent)})
    ema.copy_to(unet.parameters())
    unet.eval()
    text_encoder.eval()
    return {"loss_last100": sum(recent) / len(recent) if recent else None}


def vae_pool(images: np.ndarray, config: TinyWorldConfig, work: Path, workers: int = 2,
             progress: bool = True) -> np.ndarray:
    """What the VAE stages train on: the UNet's pool ``images`` and, with ``vae_novel`` > 0, as many
    scenes again of which that share have an unnamed background and that share an unnamed style
    (`cns.world.recipes`): the high-contrast stripes, checks, motif fields and fills that personal
    concepts are made of, which the issue asks pretraining to cover. Only the VAE sees them, so
    the UNet's captions stay those of named scenes."""
    if not config.vae_novel:
        return images
    return np.concatenate([images, recipe_pool(config, config.vae_novel, work, workers, progress)])


def recipe_pool(config: TinyWorldConfig, share: float, work: Path, workers: int = 2,
                progress: bool = True) -> np.ndarray:
    """``pool_size`` train-split scenes at the model's size, ``share`` of them on an unnamed background
    recipe and ``share`` in an unnamed style recipe (rendered once, cached under ``work/pool``)."""
    from .dataset import render_pool

    _, images = render_pool(config.pool_size, config.seed, "train", config.render_size, work / "pool",
                            workers=workers, progress=progress, novel_background=share, novel_style=share,
                            legible=config.legible)
    return resize_images(images, config.image_size)


# ------------------------------------------------------------------ the command


_LATER_SETTINGS = ("legible", "unet_attention_levels", "vae_novel", "beta_schedule", "beta_start", "beta_end",
                   "prediction_type", "zero_terminal_snr", "timestep_spacing", "x0_loss_weight", "snr_shift")


def pretrain(work: Path, out: Path, config: TinyWorldConfig, workers: int = 2, progress: bool = True) -> dict:
    """Run (or resume) all stages and save the pipeline to ``out``; returns a report."""
    from diffusers import StableDiffusionPipeline

    from .dataset import render_pool

    work.mkdir(parents=True, exist_ok=True)
    # (settings added later are left out at their defaults, so work folders from before them still resume)
    defaults = asdict(TinyWorldConfig())
    settings = {k: v for k, v in asdict(config).items()
                if k != "extra" and not (k in _LATER_SETTINGS and v == defaults[k])}
    settings_path = work / "config.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != json.loads(json.dumps(settings)):
        raise SystemExit(f"{work} holds a run with other settings; use another --work folder")
    settings_path.write_text(json.dumps(settings, indent=2))
    times = {}
    started = time.perf_counter()
    scenes, images = render_pool(config.pool_size, config.seed, "train", config.render_size, work / "pool",
                                 workers=workers, progress=progress, novel_background=config.novel_background,
                                 novel_style=config.novel_style, legible=config.legible)
    images = resize_images(images, config.image_size)
    times["render_s"] = time.perf_counter() - started
    t = time.perf_counter()
    vae_images = vae_pool(images, config, work, workers, progress)
    times["render_vae_pool_s"] = time.perf_counter() - t

    tokenizer = build_tokenizer(config.max_length)
    vae, text_encoder, unet, scheduler = build_components(config, tokenizer)
    t = time.perf_counter()
    vae_report = train_vae(vae, vae_images, config, work, progress)
    times["vae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    decoder_report = finetune_decoder(vae, vae_images, config, work, progress)
    times["decoder_s"] = time.perf_counter() - t
    refine_report = None
    if config.refine_steps:
        t = time.perf_counter()
        refine_report = refine_decoder(vae, vae_images, config, work, progress)
        times["refine_s"] = time.perf_counter() - t
    appearance_report = None
    if config.appearance_steps:
        t = time.perf_counter()
        appearance = recipe_pool(config, config.appearance_novel, work, workers, progress)
        appearance_report = finetune_decoder_appearance(vae, appearance, config, work, progress)
        del appearance
        times["appearance_s"] = time.perf_counter() - t  # the VAE leaves here frozen
    del vae_images

    t = time.perf_counter()
    latents_path = work / "latents.safetensors"
    from safetensors.torch import load_file, save_file

    if latents_path.exists():
        stored = load_file(latents_path)
        latents = (stored["mean"], stored["std"])
    else:
        latents = encode_pool(vae, images)
        save_file({"mean": latents[0].contiguous(), "std": latents[1].contiguous()}, latents_path)
    scaling = float(1.0 / latents[0].std())
    vae.register_to_config(scaling_factor=scaling)
    config.extra["scaling_factor"] = scaling
    times["encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    unet_report = train_unet(unet, text_encoder, tokenizer, scheduler, latents, scenes, config, work, progress)
    times["unet_s"] = time.perf_counter() - t

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    sizes = {c: sum(p.numel() for p in getattr(pipe, c).parameters()) for c in ("vae", "text_encoder", "unet")}
    report = {
        "config": settings,
        "parameters": sizes,
        "scaling_factor": scaling,
        "vae": vae_report,
        "decoder": decoder_report,
        "refine": refine_report,
        "appearance": appearance_report,
        "unet": unet_report,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="world-pretrain", help="work folder: pool cache, checkpoints (resumable)")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_PATH), help="where the diffusers pipeline is saved")
    parser.add_argument("--workers", type=int, default=2, help="render processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--legible", action="store_true",
                        help="only scenes whose render shows what the caption names (is_legible); the shipped "
                             "model's pool also has the others, and a legible pool did not pretrain a better model")
    for name, value in asdict(TinyWorldConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if name in ("legible", "extra"):
            continue
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=_int_tuple, default=value, metavar="N,N,...")
        elif value is None:  # an optional number (x0_loss_weight)
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TinyWorldConfig(**{k: getattr(args, k) for k in asdict(TinyWorldConfig()) if hasattr(args, k)
                                and k != "extra"})
    config.legible = args.legible
    config.extra["checkpoint_every"] = args.checkpoint_every
    report = pretrain(Path(args.work), Path(args.out), config, workers=args.workers)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
