"""Evaluation: a glyph classifier trained on renders, and FID, KID, IS, CLIP score, LPIPS and prompt accuracy."""
