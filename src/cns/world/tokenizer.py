"""A CLIP tokenizer built from a word list, with no download: byte-level BPE whose merges
make every listed word one token, in the exact format of OpenAI's CLIP tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

__all__ = ["build_clip_tokenizer", "train_bpe"]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"


def train_bpe(pieces: Iterable[str], end_of_word: str = END_OF_WORD) -> list[tuple[str, str]]:
    """BPE merges (Sennrich et al., 2016) that turn every piece into one symbol.

    Each step merges the most frequent adjacent pair over all pieces; ties go to the
    smallest pair in string order, so the merges depend only on the pieces. (``tokenizers``'
    ``BpeTrainer`` breaks ties in hash order: two builds from the same words held the same
    tokens under different ids, and a text encoder trained with one read another's ids
    wrongly.)
    """
    words = [list(w[:-1]) + [w[-1] + end_of_word] for w in sorted(set(pieces)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, w in enumerate(words):
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    merged.append(w[i] + w[i + 1])
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[k] = merged


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77, save_to: str | Path | None = None):
    """A ``transformers.CLIPTokenizer`` whose vocabulary holds the 256 byte symbols (so any
    text tokenizes), the special tokens, and every word of ``words`` as one token.

    The words go through CLIP's own normalizer and pre-tokenizer, and `train_bpe` merges
    each resulting piece into one token, so each listed word encodes to exactly that token.
    The same words give the same vocabulary, ids and merges in every run. With ``save_to``
    the tokenizer is saved there.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer
    pieces = {piece for w in words if w.strip()
              for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(w.strip()))}
    merges = train_bpe(pieces)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    end_symbols = sorted({w[-1] + END_OF_WORD for w in pieces})
    tokens = list(SPECIAL_TOKENS) + alphabet + end_symbols + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if save_to is not None:
        tokenizer.save_pretrained(save_to)
    return tokenizer
