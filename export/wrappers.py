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


def _residuals(residuals) -> dict:
    """diffusers' UNet arguments for a ControlNet's residuals (the down blocks', then the mid block's)."""
    return {"down_block_additional_residuals": list(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


class ControlledUNet(UNet):
    """The UNet adding a ControlNet's residuals (summed over ControlNets by the pipeline)."""

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False, **_residuals(residuals))[0]


class ControlledConditionedUNet(ConditionedUNet):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False,
                          **_residuals(residuals))[0]


class ControlNet(torch.nn.Module):
    """diffusers' ControlNetModel: the UNet's inputs (SDXL's pooled text and sizes too), the control
    image in [0, 1] and one conditioning scale per row (so requests of different scales batch
    together); the residuals out, each multiplied by its row's scale as diffusers multiplies them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.conditioned = model.config.addition_embed_type == "text_time"

    @classmethod
    def load(cls, folder: Path) -> "ControlNet":
        from diffusers import ControlNetModel

        return cls(ControlNetModel.from_pretrained(folder, dtype=torch.float32))

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.conditioned else None
        controlnet_cond, scale = rest[-2], rest[-1]
        down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                               conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        scale = scale.reshape(-1, 1, 1, 1)
        return (*(r * scale for r in down), mid * scale)


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


class WithLoraInputs(torch.nn.Module):
    """A component wrapper that also takes `lora_A.<module>` (r, in) and `lora_B.<module>` (out, r)
    for each adapted layer (after the spec's inputs, in the declared order), and adds B (A x) to that
    layer's output: the graph `kiln export onnx --lora-inputs` writes (kiln.pipeline.adapters)."""

    def __init__(self, inner: torch.nn.Module, layers):
        super().__init__()
        self.inner, self.layers = inner, list(layers)
        self._current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        model = inner.model if hasattr(inner, "model") else inner.vae
        modules = dict(model.named_modules())
        for layer in self.layers:  # text encoders: declared from `text_model.`, which transformers 5 leaves out
            module = modules.get(layer.module) or modules[layer.module.removeprefix("text_model.")]
            module.register_forward_hook(self._hook(layer))

    def _hook(self, layer):
        def add_update(module, args, output):
            pair = self._current.get(layer.module)
            if pair is None:  # the inner module called on its own, or a layer without inputs: the plain layer
                return None
            a, b = pair
            x = args[0]
            if layer.conv:  # 1x1 convolution: the same update per pixel
                return output + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a[:, :, None, None]),
                                                           b[:, :, None, None])
            return output + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return add_update

    def forward(self, *args):
        count = len(args) - 2 * len(self.layers)
        pairs = args[count:]
        self._current = {layer.module: (pairs[2 * i], pairs[2 * i + 1]) for i, layer in enumerate(self.layers)}
        try:
            return self.inner(*args[:count])
        finally:
            self._current = {}


def adaptable_layers(inner: torch.nn.Module, component: str, family: str, unet_config: dict | None = None):
    """The layers kohya's standard LoRA trains, as kiln.pipeline.adapters.AdaptedLayer: the UNet's
    linear layers and 1x1 convolutions inside its transformer blocks (`attentions`), and the linear
    layers of a text encoder's transformer layers."""
    from kiln.models.lora_files import TEXT_PREFIXES
    from kiln.pipeline.adapters import AdaptedLayer

    model = inner.model
    layers = []
    if component == "unet":
        table = None
        if family == "sdxl":  # kohya's SDXL files use the original (sgm) names
            from kiln.models.single_file import _unet_prefixes

            table = sorted(_unet_prefixes(unet_config), key=lambda row: -len(row[0]))
        for name, module in model.named_modules():
            if ".attentions." not in f".{name}":
                continue
            conv = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
            if not (isinstance(module, torch.nn.Linear) or conv):
                continue
            if table is not None:
                from kiln.models.single_file import _rename

                kohya_path = _rename(name, table, "unet")
            else:
                kohya_path = name
            features = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
            layers.append(AdaptedLayer("unet", name, *features, "lora_unet_" + kohya_path.replace(".", "_"), conv))
        return layers
    prefix = TEXT_PREFIXES[("sdxl" if family == "sdxl" else "sd", component)]
    for name, module in model.named_modules():
        if ".encoder.layers." in f".{name}" and isinstance(module, torch.nn.Linear):
            name = name if name.startswith("text_model.") else f"text_model.{name}"  # as LoRA files name it
            layers.append(AdaptedLayer(component, name, module.in_features, module.out_features,
                                       f"{prefix}_{name.replace('.', '_')}"))
    return layers
