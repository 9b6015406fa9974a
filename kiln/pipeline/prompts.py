"""Tokenizer loading and Textual Inversion token expansion shared by every prompt path."""

from __future__ import annotations

from pathlib import Path



def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def expand_multi_vector_tokens(text: str, tokenizer) -> str:
    """A Textual Inversion token learned with several vectors stands for `tok tok_1 ... tok_n`, as
    diffusers' `maybe_convert_prompt` expands it."""
    added = tokenizer.get_added_vocab()
    if not any(f"{token}_1" in added for token in added):
        return text  # no multi-vector token: nothing to look for (and no per-fragment tokenizing)
    for token in dict.fromkeys(tokenizer.tokenize(text)):
        if token in added and f"{token}_1" in added:
            parts, i = [token], 1
            while f"{token}_{i}" in added:
                parts.append(f"{token}_{i}")
                i += 1
            text = text.replace(token, " ".join(parts))
    return text
