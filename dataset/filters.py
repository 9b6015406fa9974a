"""Optional quality filters from local weights: CLIP image-text similarity and the LAION aesthetic
score (an MLP on CLIP image embeddings). Nothing is downloaded: absent files are named in the error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.errors import DatasetError


class ClipScorer:
    """CLIPScore-style similarity: 100 x cosine(image embedding, caption embedding), floored at 0.
    `folder`: local CLIP weights in transformers' or open_clip's layout (kiln.models.clip)."""

    def __init__(self, folder: Path):
        from kiln.models.clip import ClipError, load_clip

        try:
            clip = load_clip(folder)
        except ClipError as exc:
            raise DatasetError(str(exc), hint=exc.hint) from None
        self.model, self.tokenizer, self.image_size = clip.model, clip.tokenizer, clip.image_size
        self.mean, self.std, self.layout = np.array(clip.mean, np.float32), np.array(clip.std, np.float32), clip.layout
        self.max_length = self.model.config.text_config.max_position_embeddings

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP's preprocessing: resize the short side, centre crop, normalise. (1, 3, S, S)"""
        from kiln.dataset.prepare import cover

        array = np.asarray(cover(image.convert("RGB"), self.image_size, self.image_size, Image.BICUBIC), dtype=np.float32) / 255.0
        array = (array - self.mean) / self.std
        return torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0)

    @torch.inference_mode()
    def image_embedding(self, image: Image.Image) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values=self.pixels(image))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features, dim=-1)  # (1, D)

    @torch.inference_mode()
    def text_embedding(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer([text], padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features, dim=-1)

    def score(self, image: Image.Image, caption: str) -> float:
        return max(0.0, 100.0 * float((self.image_embedding(image) * self.text_embedding(caption)).sum()))


class AestheticMlp(torch.nn.Module):
    """The LAION improved aesthetic predictor head (sac+logos+ava1-l14-linearMSE.pth layout)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class AestheticScorer:
    def __init__(self, weights: Path, clip: ClipScorer | None):
        weights = Path(weights)
        if clip is None:
            raise DatasetError("--aesthetic-weights needs --clip-model: the score is computed on CLIP image embeddings",
                               hint="pass the CLIP ViT-L/14 folder the predictor was trained on")
        if not weights.is_file():
            raise DatasetError(
                f"--aesthetic-weights {weights} does not exist",
                hint="give the LAION aesthetic predictor state dict, e.g. sac+logos+ava1-l14-linearMSE.pth "
                "(keys layers.0.weight ... layers.7.bias)",
            )
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            self.mlp = AestheticMlp(state["layers.0.weight"].shape[1])
            self.mlp.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise DatasetError(f"{weights} is not an aesthetic predictor state dict: {e}") from None
        self.mlp.eval()
        self.clip = clip

    @torch.inference_mode()
    def score(self, image: Image.Image) -> float:
        return float(self.mlp(self.clip.image_embedding(image)).squeeze())
