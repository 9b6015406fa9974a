"""Textual Inversion: new placeholder tokens whose embeddings are the only weights that train
(https://arxiv.org/abs/2208.01618). Saved as {placeholder: (num_vectors, dim)}, the layout
diffusers' `load_textual_inversion` reads."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import ConfigError
from kiln.training.config import TrainConfig
from kiln.training.loop import MethodSetup, Models

WEIGHTS_NAME = "learned_embeds.safetensors"


def placeholder_tokens(token: str, count: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, count)]


SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # the SDXL embedding layout diffusers and A1111 read


def build(config: TrainConfig, models: Models) -> MethodSetup:
    """One set of new rows per text encoder (SDXL: both, saved as clip_l and clip_g), initialised from
    the initializer token's row; every other row is put back after each step."""
    spec = config.textual_inversion
    tokens = placeholder_tokens(spec.placeholder_token, spec.num_vectors)
    rows = {}
    for name in models.text_encoders:
        tokenizer = models.tokenizer if name == "text_encoder" else models.tokenizer_2
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ConfigError(f"textual_inversion.placeholder_token={spec.placeholder_token!r} is already in the vocabulary",
                              hint="choose a token the tokenizer does not know, such as <my-style>")
        initializer = tokenizer.encode(spec.initializer_token, add_special_tokens=False)
        if len(initializer) != 1:
            raise ConfigError(f"textual_inversion.initializer_token={spec.initializer_token!r} is {len(initializer)} tokens",
                              hint="use a single word the tokenizer knows, such as 'style' or 'dog'")
        ids = tokenizer.convert_tokens_to_ids(tokens)
        encoder = getattr(models, name)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[ids] = embeddings[initializer[0]].clone()
        frozen = torch.ones(len(tokenizer), dtype=torch.bool)
        frozen[ids] = False
        embeddings.requires_grad_(True)
        rows[name] = (embeddings, ids, embeddings.detach().clone(), frozen)
    joined = " ".join(tokens)

    def after_step(m: Models) -> None:
        # The optimiser updates the whole matrix (weight decay, Adam moments): put every other row back.
        with torch.no_grad():
            for embeddings, _, original, frozen in rows.values():
                embeddings[frozen] = original[frozen]

    def save(m: Models, output_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        path = Path(output_dir) / WEIGHTS_NAME
        if m.family == "sdxl":
            tensors = {SDXL_KEYS[name]: e.detach()[ids].cpu().contiguous() for name, (e, ids, _, _) in rows.items()}
        else:
            embeddings, ids, _, _ = rows["text_encoder"]
            tensors = {spec.placeholder_token: embeddings.detach()[ids].cpu().contiguous()}
        save_file(tensors, str(path), metadata={"kiln.placeholder_token": spec.placeholder_token})
        return [path]

    return MethodSetup(
        trainable=list(rows),
        parameters=[e for e, _, _, _ in rows.values()],
        save=save,
        after_step=after_step,
        caption=lambda caption: spec.caption_template.format(caption=caption, token=joined),
    )
