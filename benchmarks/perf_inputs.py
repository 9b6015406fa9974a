"""`kiln bench --perf-analyzer-input OUT`: inputs for NVIDIA's own tools on a GPU host where they exist.

- `txt2img.json`: perf_analyzer's `--input-data` for the public ensemble (prompts and request fields);
- `pipeline.json`: the same requests as the BLS `pipeline` model takes them (the tokenizer's ids and
  weights, computed here by Kiln's own tokenizer core, so the BLS model can be profiled alone);
- `model-analyzer.yaml`: a Model Analyzer configuration that profiles `pipeline` with its BLS
  composing models (`bls_composing_models`), perf_analyzer reading `pipeline.json`;
- `README.md`: the commands.

perf_analyzer's JSON gives each tensor as {"content": [...flattened...], "shape": [...]}, the batch
dimension left out for a model with max_batch_size > 0 (`pipeline`), included for one without (the
`txt2img` ensemble)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEFAULT_PROMPTS = ("a red digit 7 on a white background", "a blue digit 3 on a black background",
                   "a green digit 0 on a gray background", "a (yellow:1.2) digit 5 on a white background")


def _tensor(array: np.ndarray) -> dict:
    array = np.asarray(array)
    content = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    return {"content": content, "shape": list(array.shape)}


def requests(onnx_dir: Path, family, prompts: tuple[str, ...], fields: dict) -> tuple[list[dict], list[dict]]:
    """(txt2img entries, pipeline entries) for perf_analyzer, one per prompt; `family`: the export's."""
    from kiln.model_repository.python_models import TokenizerModel

    tokenizer = TokenizerModel(Path(onnx_dir), {"tokenizers": list(family.tokenizers)})
    types = _request_types()
    public, bls = [], []
    for prompt in prompts:
        values = {"prompt": prompt.encode(), **fields}
        public.append({name: _tensor(np.array([value], dtype=types[name])) for name, value in values.items()})
        tokens = tokenizer.run(np.array([prompt.encode()], dtype=object), None)
        entry = {name: _tensor(array) for name, array in tokens.items()}  # (chunks, 77): no batch dimension
        entry.update({name: _tensor(np.array([value], dtype=types[name])) for name, value in values.items()})
        bls.append(entry)
    return public, bls


def _request_types() -> dict:
    from kiln.pipeline.request import NUMPY_DTYPES, TXT2IMG_INPUTS

    return {f.name: NUMPY_DTYPES[f.datatype] for f in TXT2IMG_INPUTS}


def model_analyzer_config(repository: str, family_components: list[str]) -> str:
    import yaml

    config = {
        "model_repository": repository,
        "run_config_search_mode": "quick",
        "triton_launch_mode": "local",
        "profile_models": {"pipeline": {"perf_analyzer_flags": {"input-data": "pipeline.json"}}},
        "bls_composing_models": ",".join(family_components),
        "perf_output": True,
    }
    return yaml.safe_dump(config, sort_keys=False)


def write(onnx_dir: Path, out_dir: Path, prompts: tuple[str, ...] = DEFAULT_PROMPTS, steps: int = 20,
          repository: str = "/models") -> dict[str, Path]:
    """The files above, for the model exported in `onnx_dir`; `repository`: where the repository will be
    on the GPU host."""
    from kiln.artifacts import read_export

    family = read_export(onnx_dir).family
    fields = {"steps": steps, "seed": 0}
    public, bls = requests(Path(onnx_dir), family, prompts, fields)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"txt2img.json": {"data": public}, "pipeline.json": {"data": bls}}
    for name, data in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=1) + "\n")
    composing = [*family.text_encoders, "unet", "vae_decoder"]
    (out_dir / "model-analyzer.yaml").write_text(model_analyzer_config(repository, composing))
    (out_dir / "README.md").write_text(f"""# perf_analyzer and Model Analyzer inputs ({len(prompts)} requests, {steps} steps)

On a host with NVIDIA's Triton SDK container (perf_analyzer, model-analyzer) and the server running:

    perf_analyzer -m txt2img -i grpc -u localhost:8001 --input-data txt2img.json --concurrency-range 1:4 \\
        --measurement-mode count_windows --measurement-request-count 20
    perf_analyzer -m pipeline -i grpc -u localhost:8001 --input-data pipeline.json --concurrency-range 1:4

Model Analyzer profiles the BLS `pipeline` with its composing models ({', '.join(composing)}):

    model-analyzer profile -f model-analyzer.yaml --output-model-repository-path /tmp/ma-output
""")
    return {name: out_dir / name for name in (*files, "model-analyzer.yaml", "README.md")}
