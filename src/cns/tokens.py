"""Modifier tokens (``<new1>``, ``<new2>``, ...): naming, adding to a tokenizer / text encoder,
and initialising from the class word, as Custom Diffusion does."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

from .errors import CNSError

__all__ = [
    "TOKEN_PATTERN",
    "next_free_token",
    "find_tokens",
    "validate_new_token",
    "normalize_token",
    "prompt_token_ids",
    "truncated_part",
    "cut_tokens",
    "add_tokens",
    "class_word_embedding",
]

TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")
_AUTO_TOKEN = re.compile(r"<new(\d+)>")


def find_tokens(prompt: str) -> list[str]:
    """Every ``<token>`` written in ``prompt``, in order."""
    return TOKEN_PATTERN.findall(prompt)


def next_free_token(used: Iterable[str], vocabulary: Iterable[str] = ()) -> str:
    """The next ``<newK>`` not used by the library nor present in the vocabulary."""
    taken = set(used) | set(vocabulary)
    numbers = [int(m.group(1)) for t in taken if (m := _AUTO_TOKEN.fullmatch(t))]
    k = max(numbers, default=0) + 1
    while f"<new{k}>" in taken:
        k += 1
    return f"<new{k}>"


def normalize_token(token: str, tokenizer) -> str:
    """``token`` as ``tokenizer`` stores and matches it: a fast tokenizer's normalizer runs on
    added tokens too (CLIP's lowercases and NFC-normalises, so ``<MyDog>`` is ``<mydog>``).
    A tokenizer without a normalizer keeps the token as written."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    return normalizer.normalize_str(token) if normalizer is not None else token


def validate_new_token(token: str, library_tokens: Iterable[str], tokenizer) -> None:
    """Refuse a token that is malformed, already learned, or already in the vocabulary.
    ``token`` is the normalized form (:func:`normalize_token`)."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise CNSError(f"token {token!r} must look like <name>: angle brackets, no spaces")
    if token in set(library_tokens):
        raise CNSError(f"token {token} is already used by another concept (in this library or this task)")
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        raise CNSError(f"token {token} is already in the tokenizer's vocabulary; choose another")


def add_tokens(tokenizer, text_encoder, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to the tokenizer and grow the text encoder's embedding to match.
    Existing rows are copied unchanged; returns the new tokens' ids."""
    if not tokens:
        return []
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise CNSError(f"could not add tokens {list(tokens)} to the tokenizer (some already exist)")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, token_id in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
            raise CNSError(f"token {token} does not tokenize to a single id")
    return ids


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Every id of ``prompt`` as the text encoder would see it before truncation, start and end
    tokens included."""
    return list(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)


def truncated_part(tokenizer, prompt: str) -> tuple[list[int], str]:
    """The ids a pipeline cuts from ``prompt`` (it keeps ``model_max_length`` ids, start and end
    tokens included) and their text; empty when the prompt fits."""
    ids = prompt_token_ids(tokenizer, prompt)
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return [], ""
    special = set(getattr(tokenizer, "all_special_ids", []))
    cut = [i for i in ids[limit - 1:] if i not in special]  # the kept window ends with the end token
    return cut, tokenizer.decode(cut).strip()


def cut_tokens(tokenizer, prompt: str, tokens: Iterable[str]) -> list[str]:
    """Those of ``tokens`` written in ``prompt`` (in any spelling the tokenizer normalizes to
    them) at a place a pipeline cuts: past the ``model_max_length - 2`` ids it keeps between the
    start and end tokens."""
    wanted = {normalize_token(t, tokenizer): t for t in tokens}
    keep = tokenizer.model_max_length - 2
    cut: list[str] = []
    for match in TOKEN_PATTERN.finditer(prompt):
        token = wanted.get(normalize_token(match.group(0), tokenizer))
        if token is not None and token not in cut:
            if len(tokenizer(prompt[: match.start()], add_special_tokens=False).input_ids) >= keep:
                cut.append(token)
    return cut


@torch.no_grad()
def class_word_embedding(tokenizer, embedding: torch.Tensor, class_word: str) -> torch.Tensor:
    """The embedding row a new token starts from: the class word's row, or the mean of its
    pieces when the tokenizer splits it."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if not ids:
        raise CNSError(f"class word {class_word!r} produces no tokens")
    return embedding[ids].float().mean(dim=0)
