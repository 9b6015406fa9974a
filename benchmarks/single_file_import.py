"""Single-file import at real size, through Kiln's shipped configs: each family's real architecture
(SD 1.5, SD 2.x 768 v-prediction, SDXL base) with random weights, written in the original layout as
community files are shared (fp16, no Kiln metadata: neither its configs nor modelspec nor `v_pred`; with the extra tensors such
files carry, see `shared_extras`),
then `kiln model import` with nothing but the flag a user would need. The tiny test models cannot
check the shipped configs (their shapes differ); this does, tensor by tensor.

    python -m kiln.benchmarks.single_file_import OUT_DIR [--family sd15 sd2-v sdxl] [--keep]

Writes OUT_DIR/<family>.json: tensors compared, max |diff| against the file, unused keys, the
decision and how it was made, seconds per stage, file size.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch

BUILDS = {  # family flag -> (builder, kwargs, Kiln family, import flags a user passes)
    "sd15": ("build_sd15_pipeline", {"width": "full"}, "sd1", {}),
    "sd2-v": ("build_sd2_pipeline", {"width": "full", "prediction_type": "v_prediction"}, "sd2", {"family": "sd2-v"}),
    "sdxl": ("build_sdxl_pipeline", {"width": "full"}, "sdxl", {}),
}


def shared_extras(family: str) -> dict:
    """What shared files hold beyond the model diffusers builds: LDM's schedule buffers and EMA
    counters, CLIP's position ids, OpenCLIP's last layer and projection (SD 2.x uses the penultimate
    layer, so diffusers keeps 23 of 24), its logit scale. An import must leave them out, not fail."""
    extras = {"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    if family == "sd15":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if family == "sd2-v":
        last, width = "cond_stage_model.model.transformer.resblocks.23.", 1024
        shapes = {"ln_1.weight": [width], "ln_1.bias": [width], "attn.in_proj_weight": [3 * width, width],
                  "attn.in_proj_bias": [3 * width], "attn.out_proj.weight": [width, width], "attn.out_proj.bias": [width],
                  "ln_2.weight": [width], "ln_2.bias": [width], "mlp.c_fc.weight": [4 * width, width],
                  "mlp.c_fc.bias": [4 * width], "mlp.c_proj.weight": [width, 4 * width], "mlp.c_proj.bias": [width]}
        extras.update({last + k: torch.randn(v, dtype=torch.float16) for k, v in shapes.items()})
        extras["cond_stage_model.model.text_projection"] = torch.randn(width, width, dtype=torch.float16)
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    if family == "sdxl":
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        extras["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return extras


def check(family: str, out_dir: Path, keep: bool = False) -> dict:
    from safetensors.torch import save_file

    from kiln.models import benchmark
    from kiln.models.single_file import MANIFEST, import_single_file, original_state_dict

    builder, kwargs, kiln_family, flags = BUILDS[family]
    out_dir.mkdir(parents=True, exist_ok=True)
    single, imported = out_dir / f"{family}.safetensors", out_dir / f"{family}-imported"
    times = {}
    begun = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16, as most shared files are: half the memory
    try:
        pipe = getattr(benchmark, builder)(**kwargs)
    finally:
        torch.set_default_dtype(default)
    state = original_state_dict(pipe, kiln_family) | shared_extras(family)
    del pipe
    gc.collect()
    times["build_s"] = time.perf_counter() - begun
    begun = time.perf_counter()
    save_file(state, str(single))
    del state
    gc.collect()
    times["write_s"] = time.perf_counter() - begun
    begun = time.perf_counter()
    import_single_file(single, imported, **flags)
    times["import_s"] = time.perf_counter() - begun
    manifest = json.loads((imported / MANIFEST).read_text())
    report = {"checkpoint": family, "file_bytes": single.stat().st_size, "import_flags": flags,
              **{k: manifest[k] for k in ("family", "prediction_type", "decided_by", "config", "tensors",
                                          "max_abs_diff", "unused_keys")}, **times}
    (out_dir / f"{family}.json").write_text(json.dumps(report, indent=2) + "\n")
    if not keep:
        single.unlink()
        shutil.rmtree(imported)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", nargs="+", default=list(BUILDS), choices=list(BUILDS))
    parser.add_argument("--keep", action="store_true", help="keep the files and imported folders")
    args = parser.parse_args()
    for family in args.family:
        report = check(family, args.out_dir, args.keep)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
