"""Prompt weighting in the syntax people already write, and prompts longer than 77 tokens.

`(word)` multiplies the attention on `word` by 1.1, `[word]` divides it by 1.1, `(word:1.5)` sets the
factor, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal, and `BREAK` starts a new 77-token
chunk. Text is tokenized into chunks of 75 tokens between BOS and EOS; each chunk is encoded on
its own and the results are concatenated, so nothing is silently truncated. Weights scale the
text encoder's output per token, then the original mean is restored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

UP, DOWN = 1.1, 1 / 1.1
MEAN_FLOOR = 1e-3  # relative size below which an embedding mean counts as zero
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    text: str  # "BREAK" alone marks a chunk boundary
    weight: float


def parse(prompt: str) -> list[Fragment]:
    """Text -> weighted fragments, adjacent fragments of equal weight merged."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            out.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif number is not None and round_open:
            scale(round_open.pop(), float(number))
        elif token == ")" and round_open:
            scale(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(["BREAK", -1.0])
                if part:
                    out.append([part, 1.0])
    for start in round_open:  # unclosed brackets still apply to the rest
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[list] = []
    for text, weight in out:
        if merged and merged[-1][1] == weight and text != "BREAK" and merged[-1][0] != "BREAK":
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [Fragment(t, 1.0 if t == "BREAK" else round(w, 10)) for t, w in merged if t]


@dataclass(frozen=True)
class TokenChunks:
    ids: np.ndarray  # (chunks, 77) int32: BOS, up to 75 tokens, EOS, padding
    weights: np.ndarray  # (chunks, 77) float32, 1.0 on BOS/EOS/padding
    tokens: int = 0  # prompt tokens, BOS/EOS/padding not counted

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def tokenize_weighted(tokenizer, prompt: str, min_chunks: int = 1) -> TokenChunks:
    """Weighted fragments -> 77-token chunks. A prompt of at most 75 tokens gives exactly the ids
    diffusers' pipeline uses; longer prompts get more chunks instead of being cut."""
    from kiln.pipeline.prompts import expand_multi_vector_tokens

    length = tokenizer.model_max_length
    body = length - 2
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for fragment in parse(prompt):
        if fragment.text == "BREAK":
            chunks.append(([], []))
            continue
        text = expand_multi_vector_tokens(fragment.text, tokenizer)
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(chunks[-1][0]) == body:
                chunks.append(([], []))
            chunks[-1][0].append(token)
            chunks[-1][1].append(fragment.weight)
    while len(chunks) < min_chunks:
        chunks.append(([], []))
    pad = tokenizer.pad_token_id
    ids = np.full((len(chunks), length), pad, dtype=np.int32)
    weights = np.ones((len(chunks), length), dtype=np.float32)
    for i, (tokens, token_weights) in enumerate(chunks):
        ids[i, 0] = tokenizer.bos_token_id
        ids[i, 1 : len(tokens) + 1] = tokens
        ids[i, len(tokens) + 1] = tokenizer.eos_token_id
        weights[i, 1 : len(tokens) + 1] = token_weights
    return TokenChunks(ids, weights, sum(len(tokens) for tokens, _ in chunks))


def apply_weights(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(chunks, 77, D) encoder output, (chunks, 77) weights -> (1, chunks*77, D).

    Scales each token's embedding by its weight, then rescales so the mean equals the original's:
    emphasis shifts attention between tokens without changing the overall magnitude. A mean that is
    nought next to the values' magnitude (an encoder whose final LayerNorm has no bias, as a
    random-weight one) carries no level to restore: dividing by it would amplify rounding noise."""
    chunks, length, dim = embeddings.shape
    out = embeddings.astype(np.float32)
    if (weights != 1.0).any():
        original_mean = out.mean(dtype=np.float64)
        out = out * weights[..., None].astype(np.float32)
        new_mean = out.mean(dtype=np.float64)
        level = np.abs(embeddings).mean(dtype=np.float64) * MEAN_FLOOR
        if abs(original_mean) > level and abs(new_mean) > level:
            out = out * np.float32(original_mean / new_mean)
    return out.reshape(1, chunks * length, dim)


def tokenize_pair(tokenizer, prompt: str, negative: str) -> tuple[TokenChunks, TokenChunks]:
    """Prompt and negative prompt with the same number of chunks (the shorter padded with empty ones),
    so their encodings stack for classifier-free guidance."""
    first, second = tokenize_weighted(tokenizer, prompt), tokenize_weighted(tokenizer, negative)
    chunks = max(first.ids.shape[0], second.ids.shape[0])
    if first.ids.shape[0] < chunks:
        first = tokenize_weighted(tokenizer, prompt, chunks)
    if second.ids.shape[0] < chunks:
        second = tokenize_weighted(tokenizer, negative, chunks)
    return first, second
