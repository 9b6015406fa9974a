"""The PyTorch side of each exported component: a module whose forward takes the spec's inputs in
their declared order and returns its outputs in their declared order, loaded in fp32 from its
diffusers subfolder. Export traces it, parity compares against it, the GPU check times it."""

from __future__ import annotations

from pathlib import Path

import torch


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, folder: Path) -> "TextEncoder":
        from transformers import CLIPTextModel

        return cls(CLIPTextModel.from_pretrained(folder, dtype=torch.float32))

    def forward(self, input_ids):
        out = self.model(input_ids.to(torch.int64), return_dict=False)
        return out[0], out[1]


class PenultimateTextEncoder(torch.nn.Module):
    """SDXL's first text encoder: the penultimate layer's hidden states (diffusers' SDXL pipelines
    with clip_skip unset)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, folder: Path) -> "PenultimateTextEncoder":
        from transformers import CLIPTextModel

        return cls(CLIPTextModel.from_pretrained(folder, dtype=torch.float32))

    def forward(self, input_ids):
        return self.model(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True).hidden_states[-2]


class PenultimateTextEncoderWithProjection(torch.nn.Module):
    """SDXL's second text encoder: penultimate hidden states and the pooled, projected text_embeds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, folder: Path) -> "PenultimateTextEncoderWithProjection":
        from transformers import CLIPTextModelWithProjection

        return cls(CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float32))

    def forward(self, input_ids):
        out = self.model(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds


class UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, folder: Path) -> "UNet":
        from diffusers import UNet2DConditionModel

        return cls(UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32))

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class ConditionedUNet(UNet):
    """SDXL's UNet: also the pooled text embedding and the size conditioning (added_cond_kwargs)."""

    @classmethod
    def load(cls, folder: Path) -> "ConditionedUNet":
        from diffusers import UNet2DConditionModel

        return cls(UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32))

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def _autoencoder(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, dtype=torch.float32)


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @classmethod
    def load(cls, folder: Path) -> "VaeDecoder":
        return cls(_autoencoder(folder))

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Returns the posterior's parameters (mean, log-variance) rather than a sample, so the
    serving pipeline draws the noise from its own seeded generator."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @classmethod
    def load(cls, folder: Path) -> "VaeEncoder":
        return cls(_autoencoder(folder))

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments
