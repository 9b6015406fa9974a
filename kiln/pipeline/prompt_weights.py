"""Prompt weighting in the syntax people already write, and prompts longer than 77 tokens.

`(word)` multiplies the attention on `word` by 1.1, `[word]` divides it by 1.1, `(word:1.5)` sets the
factor, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal, and `BREAK` starts a new 77-token
chunk. Text is tokenized into chunks of 75 tokens between BOS and EOS; each chunk is encoded on
its own and the results are concatenated, so nothing is silently truncated. Weights scale the
text encoder's output per token, then each chunk's original mean is restored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from kiln.errors import RequestError
from kiln.pipeline.request import Limits

UP, DOWN = 1.1, 1 / 1.1
MAX_WEIGHT = 10.0  # |weight| of any token, nesting included: past it a float32 embedding is noise or overflows
MEAN_FLOOR = 1e-3  # relative size below which an embedding mean counts as zero
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+(?:[eE][+-]?\d+)?)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\bBREAK\b")  # not \s*BREAK\s*: that is quadratic on a long run of spaces
EDITING = ("no prompt editing [from:to:when] or alternation [a|b]: this server draws one embedding for every step. "
           "Write \\[ \\] for literal brackets")
WEIGHT_SYNTAX = f"weights as (word:1.2) with a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"


@dataclass(frozen=True)
class Fragment:
    text: str  # "BREAK" alone marks a chunk boundary
    weight: float


class _Bracket:
    """An open bracket; every fragment written inside it points here. Its factor is known when it
    closes, so each fragment's weight is computed once at the end: linear in the prompt's length."""

    __slots__ = ("parent", "factor", "weight")

    def __init__(self, parent: "_Bracket | None", factor: float):
        self.parent, self.factor, self.weight = parent, factor, 1.0


def _weight_number(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RequestError(field, f"(...:{text})", WEIGHT_SYNTAX) from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise RequestError(field, f"(...:{text})", WEIGHT_SYNTAX)
    return value


_ESCAPED = re.compile(r"\\.")
_NUMBER_TAIL = set("0123456789.+- \t")
_SCHEDULED = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")  # the `when` of [from:to:when]


def refuse_editing(prompt: str, field: str) -> None:
    """Raise RequestError for A1111's prompt editing or alternation anywhere in `prompt`, nested too:
    a closed [...] whose text ends in :NUMBER ([from:to:when], [to:when], [from::when]) or holds a |
    at its own level. Other colons in square brackets ([url:x]) and unclosed brackets stay text, as
    A1111 reads them. One pass: each ] looks back only over the number it may end with."""
    text = _ESCAPED.sub("__", prompt)
    open_groups: list[list] = []  # [kind, start, holds a |]: round groups too, a | inside them is theirs
    for i, char in enumerate(text):
        if char in "[(":
            open_groups.append([char, i, False])
        elif char == "|" and open_groups:
            open_groups[-1][2] = True
        elif char == ")" and open_groups and open_groups[-1][0] == "(":
            open_groups.pop()
        elif char == "]" and open_groups and open_groups[-1][0] == "[":
            _, start, piped = open_groups.pop()
            j = i - 1
            while j > start and text[j] in _NUMBER_TAIL:
                j -= 1
            scheduled = j > start and text[j] == ":" and _SCHEDULED.fullmatch(text[j + 1:i].strip())
            if piped or scheduled:
                raise RequestError(field, prompt[max(0, start - 20):i + 21], EDITING)


def parse(prompt: str, field: str = "prompt") -> list[Fragment]:
    """Text -> weighted fragments, adjacent fragments of equal weight merged. Raises RequestError
    (naming `field`) for a weight that is not a number or lies outside [-MAX_WEIGHT, MAX_WEIGHT],
    nesting included."""
    refuse_editing(prompt, field)
    items: list[tuple[str, _Bracket | None, _Bracket | None]] = []
    brackets: list[_Bracket] = []  # in opening order: a parent always precedes its children
    open_round: _Bracket | None = None
    open_square: _Bracket | None = None

    def opened(parent: _Bracket | None, factor: float) -> _Bracket:
        brackets.append(_Bracket(parent, factor))
        return brackets[-1]

    for match in _TOKENS.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            items.append((token[1], open_round, open_square))
        elif token == "(":
            open_round = opened(open_round, UP)  # unclosed brackets still apply to the rest
        elif token == "[":
            open_square = opened(open_square, DOWN)
        elif number is not None and open_round is not None:
            open_round.factor = _weight_number(number, field)
            open_round = open_round.parent
        elif number is not None:  # "(...:1.5)" without an opening bracket: literal text
            items.append((token, open_round, open_square))
        elif token == ")" and open_round is not None:
            open_round = open_round.parent
        elif token == "]" and open_square is not None:
            open_square = open_square.parent
        else:
            parts = _BREAK.split(token)
            for i, part in enumerate(parts):
                if i:
                    items.append(("BREAK", None, None))
                    part = part.lstrip()  # whitespace around BREAK goes with it
                if i < len(parts) - 1:
                    part = part.rstrip()
                if part:
                    items.append((part, open_round, open_square))
    for bracket in brackets:
        bracket.weight = bracket.factor * (bracket.parent.weight if bracket.parent is not None else 1.0)
    merged: list[list] = []
    for text, in_round, in_square in items:
        if text == "BREAK":
            merged.append(["BREAK", 1.0, True])
            continue
        weight = (in_round.weight if in_round else 1.0) * (in_square.weight if in_square else 1.0)
        weight = round(weight, 10)
        if not abs(weight) <= MAX_WEIGHT:
            raise RequestError(field, f"<{text[:40]!r} at weight {weight:.4g}>",
                               f"{WEIGHT_SYNTAX}; nested brackets multiply (each ( by 1.1)")
        if merged and not merged[-1][2] and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight, False])
    return [Fragment(t, w) for t, w, _ in merged if t]


@dataclass(frozen=True)
class TokenChunks:
    ids: np.ndarray  # (chunks, 77) int32: BOS, up to 75 tokens, EOS, padding
    weights: np.ndarray  # (chunks, 77) float32, 1.0 on BOS/EOS/padding
    tokens: int = 0  # prompt tokens, BOS/EOS/padding not counted

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def tokenize_weighted(tokenizer, prompt: str, min_chunks: int = 1, field: str = "prompt",
                      limits: Limits | None = None) -> TokenChunks:
    """Weighted fragments -> 77-token chunks. A prompt of at most 75 tokens gives exactly the ids
    diffusers' pipeline uses; longer prompts get more chunks instead of being cut.

    With `limits`, characters are counted before anything is parsed, chunks before anything is
    tokenized, and tokens before any array is built; each overrun is a RequestError naming `field`."""
    from kiln.pipeline.prompts import expand_multi_vector_tokens

    if limits is not None and len(prompt) > limits.max_prompt_chars:
        raise RequestError(field, f"<{len(prompt)} characters>", f"at most {limits.max_prompt_chars} characters")
    fragments = parse(prompt, field)
    if limits is not None and 1 + sum(f.text == "BREAK" for f in fragments) > limits.max_prompt_chunks:
        raise RequestError(field, f"<{sum(f.text == 'BREAK' for f in fragments)} BREAKs>",
                           f"at most {limits.max_prompt_chunks} chunks ({limits.max_prompt_chunks - 1} BREAKs)")
    texts = [expand_multi_vector_tokens(f.text, tokenizer) for f in fragments if f.text != "BREAK"]
    encoded = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])  # one call: linear
    length = tokenizer.model_max_length
    body = length - 2
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for fragment in fragments:
        if fragment.text == "BREAK":
            chunks.append(([], []))
            continue
        for token in next(encoded):
            if len(chunks[-1][0]) == body:
                chunks.append(([], []))
            chunks[-1][0].append(token)
            chunks[-1][1].append(fragment.weight)
    tokens = sum(len(t) for t, _ in chunks)
    if limits is not None and tokens > limits.max_prompt_tokens:
        raise RequestError(field, f"<{tokens} tokens>", f"at most {limits.max_prompt_tokens} tokens")
    if limits is not None and len(chunks) > limits.max_prompt_chunks:
        raise RequestError(field, f"<{len(chunks)} chunks of 75 tokens>", f"at most {limits.max_prompt_chunks} chunks")
    while len(chunks) < min_chunks:
        chunks.append(([], []))
    pad = tokenizer.pad_token_id
    ids = np.full((len(chunks), length), pad, dtype=np.int32)
    weights = np.ones((len(chunks), length), dtype=np.float32)
    for i, (chunk_tokens, token_weights) in enumerate(chunks):
        ids[i, 0] = tokenizer.bos_token_id
        ids[i, 1 : len(chunk_tokens) + 1] = chunk_tokens
        ids[i, len(chunk_tokens) + 1] = tokenizer.eos_token_id
        weights[i, 1 : len(chunk_tokens) + 1] = token_weights
    return TokenChunks(ids, weights, tokens)


def apply_weights(embeddings, weights) -> torch.Tensor:
    """(chunks, 77, D) encoder output, (chunks, 77) weights (torch or numpy) -> (1, chunks*77, D) torch,
    on the embeddings' device.

    Scales each token's embedding by its weight, then rescales each 77-token chunk so its mean equals
    its original mean, as A1111 does chunk by chunk: emphasis shifts attention between tokens without
    changing the overall magnitude, and a chunk without weights is left exactly as encoded. A mean
    that is nought next to the values' magnitude (an encoder whose final LayerNorm has no bias, as a
    random-weight one) carries no level to restore: dividing by it would amplify rounding noise."""
    embeddings = torch.as_tensor(embeddings)
    weights = torch.as_tensor(weights, device=embeddings.device)
    chunks, length, dim = embeddings.shape
    out = embeddings.to(torch.float32)
    if bool((weights != 1.0).any()):
        scaled = []
        for chunk, chunk_weights in zip(out, weights):
            if not bool((chunk_weights != 1.0).any()):
                scaled.append(chunk)
                continue
            original_mean = float(chunk.double().mean())
            level = float(chunk.abs().double().mean()) * MEAN_FLOOR
            chunk = chunk * chunk_weights[:, None].to(torch.float32)
            new_mean = float(chunk.double().mean())
            if abs(original_mean) > level and abs(new_mean) > level:
                chunk = chunk * np.float32(original_mean / new_mean).item()
            scaled.append(chunk)
        out = torch.stack(scaled)
    return out.reshape(1, chunks * length, dim)


def tokenize_prompts(tokenizers, prompt: str, negative: str,
                     limits: Limits | None = None) -> tuple[tuple[TokenChunks, ...], tuple[TokenChunks, ...]]:
    """Prompt and negative prompt through each tokenizer (one per text encoder: SDXL has two, which
    differ in padding), every result with the same number of chunks (the shorter padded with empty
    ones), so their encodings stack for classifier-free guidance and sit side by side across encoders.
    `limits`: see tokenize_weighted."""
    sides = [[tokenize_weighted(tokenizer, text, field=field, limits=limits) for tokenizer in tokenizers]
             for text, field in ((prompt, "prompt"), (negative, "negative_prompt"))]
    chunks = max(c.ids.shape[0] for side in sides for c in side)
    for side, text, field in zip(sides, (prompt, negative), ("prompt", "negative_prompt")):
        for i, tokenizer in enumerate(tokenizers):
            if side[i].ids.shape[0] < chunks:
                side[i] = tokenize_weighted(tokenizer, text, chunks, field)
    return tuple(sides[0]), tuple(sides[1])


def tokenize_pair(tokenizer, prompt: str, negative: str, limits: Limits | None = None) -> tuple[TokenChunks, TokenChunks]:
    """One tokenizer's tokenize_prompts."""
    (first,), (second,) = tokenize_prompts([tokenizer], prompt, negative, limits)
    return first, second
