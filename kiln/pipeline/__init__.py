"""The denoising pipeline core shared by the Triton BLS model and the in-process reference."""
