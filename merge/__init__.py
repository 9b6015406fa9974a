"""Merge: adapters fused into a plain diffusers folder, with a manifest."""
