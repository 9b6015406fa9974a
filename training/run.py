"""Entry point for `kiln train METHOD`: config first (validated before any model loads), then the loop."""

from __future__ import annotations

from pathlib import Path

from kiln.training.config import load_config


def builder(method: str):
    from kiln.training import controlnet, dreambooth, full, lora, textual_inversion

    return {"lora": lora.build, "dreambooth": dreambooth.build, "textual-inversion": textual_inversion.build,
            "full": full.build, "controlnet": controlnet.build}[method]


def run_training(method: str, config_path: Path | None, overrides: list[str], resume: str | None = None) -> dict:
    from kiln.training.loop import train

    config = load_config(method, config_path, overrides)
    return train(config, builder(method), resume)
