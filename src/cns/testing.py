"""Tiny dummy Stable Diffusion pipelines built in code (no hub), for tests and examples, in
the manner of diffusers' own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["DUMMY_WORDS", "make_dummy_pipeline", "write_dummy_images"]

DUMMY_WORDS = (
    "a an the photo of in on with and style painting picture drawing sketch "
    "dog cat hat bird car house tree flower robot star ring "
    "red blue green yellow small big left right background striped dotted plain "
    "person city street sofa mountains sunset bowl fruit table building ship sea village winter "
    "portrait man beard beach cup coffee book laboratory branch room fireplace plate pasta horse "
    "child ball park river forest vase window market shoes white"
).split()


def make_dummy_pipeline(
    save_to: str | Path | None = None,
    seed: int = 0,
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    words=DUMMY_WORDS,
    max_length: int = 16,
):
    """A ``StableDiffusionPipeline`` of a few thousand parameters: 16x16 images, 2x2x4 ... 8x8x4
    latents, two cross-attention blocks, a 2-layer CLIP text encoder reading ``max_length``
    tokens and a CLIP tokenizer made from ``words``. Deterministic for ``seed``; saved as a
    diffusers folder with ``save_to``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .world.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, model_max_length=max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if save_to is not None:
        pipe.save_pretrained(save_to, safe_serialization=True)
    return pipe


def write_dummy_images(folder: str | Path, count: int = 3, size: int = 16, seed: int = 0, color=(200, 40, 40)) -> Path:
    """``count`` small PNGs of a colored square on noise: a stand-in for a user's photos."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        array = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, size=2)
        array[y : y + size // 2, x : x + size // 2] = color
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    return folder


def make_sd15_architecture(seed: int = 0, words=DUMMY_WORDS):
    """A pipeline with Stable Diffusion 1.5's architecture (UNet 860 M, CLIP ViT-L/14 text
    encoder 123 M, VAE 84 M) and random weights, for benchmarks: same layer shapes, no download."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .world.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(49408, len(tokenizer)), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_clip(path: str | Path, words, seed: int = 0, image_tower: str = "vit") -> Path:
    """A tiny random dual encoder + ``CLIPProcessor`` (16 x 16 images, 8-d embeddings, a CLIP
    tokenizer trained on ``words``) saved to ``path``, for metric tests: a ``CLIPModel``
    (``image_tower="vit"``) or a ``VisionTextDualEncoderModel`` with an EfficientNet tower
    (``"efficientnet"``, as the tiny world's evaluator can be)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .world.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(list(words), model_max_length=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if image_tower == "efficientnet":
        from .world.evaluator import EvaluatorConfig, build_model

        # width 1/80: every stage 8 channels, the top 16 (EfficientNet scales channels by it)
        model = build_model(tokenizer, EvaluatorConfig(
            image_tower="efficientnet", text_hidden=16, text_mlp=32, text_layers=1, text_heads=2, projection_dim=8,
            effnet_width=0.0125, effnet_in=(32, 32), effnet_out=(32, 64), effnet_strides=(1, 2),
            effnet_repeats=(1, 1), effnet_expand=(1, 2)))
    elif image_tower == "vit":
        model = CLIPModel(CLIPConfig(
            text_config=text,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8),
            projection_dim=8,
        ))
    else:
        raise ValueError(f"image_tower must be 'vit' or 'efficientnet', got {image_tower!r}")
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    path = Path(path)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path
