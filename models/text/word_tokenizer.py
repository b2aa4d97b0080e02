"""A CLIP tokenizer over a small closed vocabulary, written in the released CLIP tokenizers'
layout (vocab.json, merges.txt, tokenizer_config.json; no tokenizer.json) without hub access.

The vocabulary holds single characters (alone and word-final with `</w>`), so any lowercase
word still tokenizes, then byte-pair merges that make each of `words` one token,
then `<|startoftext|>` and `<|endoftext|>` as the last ids (the legacy CLIP pooling takes the
highest id as the end token). Loaded by `transformers.CLIPTokenizer` like a released one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

CHARACTERS = "!,.'" + "abcdefghijklmnopqrstuvwxyz0123456789"
END_OF_TEXT = "<|endoftext|>"


def apply_merges(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's byte-pair encoding of one lowercase word: characters with `</w>` on the last,
    then repeatedly the highest-priority (earliest) merge among adjacent pairs."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    rank = {m: i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        ranks = [rank[pair] for pair in pairwise(pieces) if pair in rank]
        if not ranks:
            break
        best = merges[min(ranks)]
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_clip_word_tokenizer(
    path: Path, words: Iterable[str], max_length: int, pad_token: str = END_OF_TEXT
) -> CLIPTokenizer:
    """Write the tokenizer to `path` (prompts padded or truncated to `max_length` tokens,
    start and end included) and load it."""
    tokens = [*CHARACTERS, *(c + "</w>" for c in CHARACTERS)]
    merges: list[tuple[str, str]] = []
    for word in words:
        # Merges are learned as BPE would apply them: while the merges so far leave the word
        # in pieces, add the merge of its first two pieces at the lowest priority. Merges of
        # earlier words cannot split it (they never apply while a better pair is present),
        # nor can its own merges split an earlier word.
        pieces = apply_merges(word, merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
            pieces = apply_merges(word, merges)
    tokens += ["<|startoftext|>", END_OF_TEXT]
    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "pad_token": pad_token,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(path)
