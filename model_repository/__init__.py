"""Triton model repositories built from exported components."""
