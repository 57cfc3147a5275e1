"""The memory options of `cns learn` (docs/performance.md) reach the model while it trains, and
leave it as it was afterwards."""

import pytest
import torch

from cns import LearnConfig
from cns.cli import _learn_config, build_parser
from cns.errors import CNSError
from cns.model import cross_attention_kv_layers
from cns.testing import make_dummy_pipeline
from cns.tokens import add_tokens
from cns.training import Example, train_task


def _spy_on_unet(pipe):
    seen = []
    unet = pipe.unet
    forward = unet.forward

    def spy(*args, **kwargs):
        seen.append({
            "checkpointing": unet.is_gradient_checkpointing,
            "training": unet.training,
            "processors": {type(p).__name__ for p in unet.attn_processors.values()},
            "autocast": torch.is_autocast_enabled("cpu"),
            "autocast_dtype": torch.get_autocast_dtype("cpu"),
        })
        return forward(*args, **kwargs)

    unet.forward = spy
    return seen


def _train(pipe, **overrides):
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"])
    masks = {n: torch.rand(l.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.1
             for n, l in cross_attention_kv_layers(pipe.unet).items()}
    examples = [Example(torch.rand(3, 16, 16) * 2 - 1, "photo of a <new1> dog")]
    config = LearnConfig(steps=2, resolution=16, device="cpu", **overrides)
    return train_task(pipe, masks, ids, examples, [], config, progress=False)


def test_defaults_train_without_memory_options():
    pipe = make_dummy_pipeline()
    seen = _spy_on_unet(pipe)
    _train(pipe)
    assert seen and not any(s["checkpointing"] or s["autocast"] for s in seen)
    assert all("SlicedAttnProcessor" not in s["processors"] for s in seen)


def test_gradient_checkpointing_reaches_the_unet_and_is_undone():
    pipe = make_dummy_pipeline()
    seen = _spy_on_unet(pipe)
    result = _train(pipe, gradient_checkpointing=True)
    assert seen and all(s["checkpointing"] and s["training"] for s in seen)
    assert not pipe.unet.is_gradient_checkpointing and not pipe.unet.training
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_attention_slicing_reaches_the_unet_and_is_undone():
    pipe = make_dummy_pipeline()
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    seen = _spy_on_unet(pipe)
    _train(pipe, attention_slicing="max")
    assert seen and all(s["processors"] == {"SlicedAttnProcessor"} for s in seen)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before


def test_bf16_mixed_precision_autocasts_the_step_on_cpu():
    pipe = make_dummy_pipeline()
    seen = _spy_on_unet(pipe)
    result = _train(pipe, mixed_precision="bf16")
    assert seen and all(s["autocast"] and s["autocast_dtype"] == torch.bfloat16 for s in seen)
    assert all(v.dtype == torch.float32 for v in result.values.values())  # stored values stay fp32


def test_cli_flags_set_the_config():
    args = build_parser().parse_args(["learn", "lib", "--images", "x", "--class-word", "dog",
                                      "--gradient-checkpointing", "--mixed-precision", "bf16",
                                      "--attention-slicing", "auto"])
    config = _learn_config(args)
    assert config.gradient_checkpointing and config.mixed_precision == "bf16" and config.attention_slicing == "auto"
    default = _learn_config(build_parser().parse_args(["learn", "lib", "--images", "x", "--class-word", "dog"]))
    assert not default.gradient_checkpointing and default.mixed_precision == "no" and default.attention_slicing == "no"


def test_attention_slicing_is_validated():
    LearnConfig(attention_slicing="auto").validate()
    with pytest.raises(CNSError):
        LearnConfig(attention_slicing="half").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", "lib", "--attention-slicing", "half"])
