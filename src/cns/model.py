"""The model adapter: where CNS's neurons live in a diffusers UNet, and how text becomes the
conditioning they see. Everything model-specific stays here, out of the algorithm."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

__all__ = ["cross_attention_kv_layers", "class_word_states", "encode_prompts", "encode_token_states", "kv_fingerprint",
           "layer_shapes", "pipeline_tokens"]


def cross_attention_kv_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every cross-attention key and value projection of ``unet``, by module name.

    A cross-attention block is an attention module whose ``is_cross_attention`` flag is set
    (diffusers' ``Attention``; ``attn2`` in SD-1.x and SD-2.x), or, for attention classes
    without that flag, a module named ``attn2``. Returns ``{"...attn2.to_k": Linear, ...}`` in
    the UNet's module order.
    """
    layers: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        is_cross = getattr(module, "is_cross_attention", None)
        if is_cross is None:
            is_cross = name.rsplit(".", 1)[-1] == "attn2"
        if not is_cross:
            continue
        for projection in ("to_k", "to_v"):
            linear = getattr(module, projection, None)
            if isinstance(linear, nn.Linear):
                layers[f"{name}.{projection}"] = linear
    if not layers:
        raise ValueError("this UNet has no cross-attention key/value projections (attn2.to_k / to_v)")
    return layers


def layer_shapes(unet: nn.Module) -> dict[str, list[int]]:
    """``{layer name: [out, in]}`` for every CNS layer of ``unet``."""
    return {name: list(linear.weight.shape) for name, linear in cross_attention_kv_layers(unet).items()}


def pipeline_tokens(tokenizer, prompts: Sequence[str]):
    """``prompts`` tokenized as a Stable Diffusion pipeline does: padded to the tokenizer's max
    length, longer ones truncated (a ``BatchEncoding`` of tensors)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


@torch.no_grad()
def _encode(tokenizer, text_encoder, prompts: Sequence[str]):
    """(tokens, float ``(n, tokens, width)`` hidden states on the CPU) of ``prompts``."""
    tokens = pipeline_tokens(tokenizer, prompts)
    device = next(text_encoder.parameters()).device
    return tokens, text_encoder(tokens.input_ids.to(device))[0].float().cpu()


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], drop_padding: bool = False) -> list[torch.Tensor]:
    """The ``encoder_hidden_states`` a Stable Diffusion pipeline feeds its UNet for each prompt.

    Prompts are padded to the tokenizer's max length, as K/V see them in the pipeline. With
    ``drop_padding`` each result keeps only the tokens up to and including the end token.
    Returns one ``(tokens, width)`` float tensor per prompt.
    """
    tokens, hidden = _encode(tokenizer, text_encoder, prompts)
    if not drop_padding:
        return list(hidden)
    lengths = tokens.attention_mask.sum(dim=1)
    return [h[: int(n)] for h, n in zip(hidden, lengths)]


def encode_token_states(tokenizer, text_encoder, token_prompts: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``(N, width)`` text-encoder outputs at the positions of each pair's token in its prompt
    (every occurrence; prompts tokenized as the pipeline does): what an added token's keys and
    values are made from. Pairs whose prompt lacks the token add nothing."""
    if not token_prompts:
        return torch.zeros(0, text_encoder.get_input_embeddings().weight.shape[1])
    token_names, prompts = zip(*token_prompts)
    tokens, hidden = _encode(tokenizer, text_encoder, prompts)
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(token_names))).unsqueeze(1)
    return hidden[tokens.input_ids == token_ids]


@torch.no_grad()
def class_word_states(tokenizer, text_encoder, prompts: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
    """``(n, tokens, width)``: for each prompt, the text states it would have with the added
    tokens ``token_ids`` taken out, aligned so that a token's position holds what stands there
    then (its class word, when the token was put before it, as cns's training prompts do).
    Prompts are tokenized as the pipeline does; what key locking holds a token's keys to."""
    tokens = pipeline_tokens(tokenizer, prompts).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    drop = torch.isin(tokens, torch.tensor(list(token_ids), dtype=tokens.dtype))
    rows = []
    for ids, gone in zip(tokens, drop):
        kept = ids[~gone]
        rows.append(torch.cat([kept, torch.full((int(gone.sum()),), pad, dtype=ids.dtype)]))
    device = next(text_encoder.parameters()).device
    return text_encoder(torch.stack(rows).to(device))[0].float().cpu()


def kv_fingerprint(unet: nn.Module, token_embedding: torch.Tensor, vocab_size: int) -> str:
    """SHA-256 over the weights CNS may touch in the *base* model: every cross-attention K/V
    weight (in layer-name order) and the first ``vocab_size`` token-embedding rows. A library
    refuses a base model whose fingerprint differs from the one it was made on."""
    digest = hashlib.sha256()
    layers = cross_attention_kv_layers(unet)
    for name in sorted(layers):
        weight = layers[name].weight.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(weight.numpy().tobytes())
    rows = token_embedding.detach()[:vocab_size].to("cpu", torch.float32).contiguous()
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()
