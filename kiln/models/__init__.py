"""Stable Diffusion model folders: loading local diffusers folders and building the tiny test model."""
