"""A CLIP tokenizer built from a word list, with no download: byte-level BPE whose merges
make every listed word one token, in the exact format of OpenAI's CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

__all__ = ["build_clip_tokenizer"]


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77, save_to: str | Path | None = None):
    """A ``transformers.CLIPTokenizer`` whose vocabulary holds the 256 byte symbols (so any
    text tokenizes), the special tokens, and every word of ``words`` as one token.

    BPE is trained on the word list itself, so each listed word encodes to exactly the
    single token the training merged it into. With ``save_to`` the tokenizer is saved there.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    vocabulary = sorted({w.strip().lower() for w in words if w.strip()})
    backend = CLIPTokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(vocabulary, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=model_max_length)
    if save_to is not None:
        tokenizer.save_pretrained(save_to)
    return tokenizer
