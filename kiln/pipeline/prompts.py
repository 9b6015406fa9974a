"""Prompt text -> token ids, exactly as diffusers' StableDiffusionPipeline.encode_prompt tokenizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    """(B, model_max_length) int32, padded to the full length and truncated there."""
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32)
