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


def build(config: TrainConfig, models: Models) -> MethodSetup:
    spec = config.textual_inversion
    tokens = placeholder_tokens(spec.placeholder_token, spec.num_vectors)
    if models.tokenizer.add_tokens(tokens) != len(tokens):
        raise ConfigError(f"textual_inversion.placeholder_token={spec.placeholder_token!r} is already in the vocabulary",
                          hint="choose a token the tokenizer does not know, such as <my-style>")
    initializer = models.tokenizer.encode(spec.initializer_token, add_special_tokens=False)
    if len(initializer) != 1:
        raise ConfigError(f"textual_inversion.initializer_token={spec.initializer_token!r} is {len(initializer)} tokens",
                          hint="use a single word the tokenizer knows, such as 'style' or 'dog'")
    ids = models.tokenizer.convert_tokens_to_ids(tokens)
    models.text_encoder.resize_token_embeddings(len(models.tokenizer), mean_resizing=False)
    embeddings = models.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[ids] = embeddings[initializer[0]].clone()
    original = embeddings.detach().clone()
    frozen_rows = torch.ones(len(models.tokenizer), dtype=torch.bool)
    frozen_rows[ids] = False
    embeddings.requires_grad_(True)
    joined = " ".join(tokens)

    def after_step(m: Models) -> None:
        # The optimiser updates the whole matrix (weight decay, Adam moments): put every other row back.
        with torch.no_grad():
            embeddings[frozen_rows] = original[frozen_rows]

    def save(m: Models, output_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        path = Path(output_dir) / WEIGHTS_NAME
        save_file({spec.placeholder_token: embeddings.detach()[ids].cpu().contiguous()}, str(path))
        return [path]

    return MethodSetup(
        trainable=["text_encoder"],
        parameters=[embeddings],
        save=save,
        after_step=after_step,
        caption=lambda caption: spec.caption_template.format(caption=caption, token=joined),
    )
