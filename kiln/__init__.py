"""Kiln: Stable Diffusion from fine-tuning to a Triton Inference Server deployment."""

__version__ = "0.1.0"
