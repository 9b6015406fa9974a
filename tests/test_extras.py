"""The core install is what NVIDIA's Triton container needs (deploy/Dockerfile installs nothing more):
the serving path (tokenizer, BLS loop, their pure cores) imports no extra's package and draws an image
with every extra's package unimportable; the extras hold the rest, and `make setup` installs them all."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the import names of every extra's packages (what the serving path must not need)
EXTRA_MODULES = ("onnx", "onnxruntime", "tritonclient", "pytriton", "peft", "kornia", "imagehash", "tensorboard",
                 "torchmetrics", "kubernetes_validate", "openvino", "mlperf_loadgen", "locust", "matplotlib",
                 "prometheus_client", "fastapi", "uvicorn", "gradio", "modelopt", "selenium", "tensorrt")

SERVE = """
import json, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: importing it fails, importlib.util.find_spec finds nothing
from pathlib import Path
import numpy as np
from kiln.model_repository.python_models import PipelineModel, TokenizerModel
from kiln.pipeline.engines import Engines, TorchRunner

repo, model_dir, settings = Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
tokens = TokenizerModel(repo / "tokenizer" / "1", {"tokenizer": "tokenizer"}).run(np.array([b"a red digit 7"], dtype=object), None)
out = PipelineModel(repo / "pipeline" / "1", settings).run(
    {**tokens, "prompt": np.array([b"a red digit 7"], dtype=object), "seed": np.array([5]), "steps": np.array([2], np.int32)},
    Engines(TorchRunner(model_dir)))
np.save(sys.argv[5], out["image"])
"""


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()


def test_the_core_holds_only_what_serving_needs_and_setup_installs_every_extra_but_gpu():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    assert not core & {"onnx", "onnxruntime", "tritonclient", "nvidia-pytriton", "peft", "torchmetrics", "locust",
                       "matplotlib", "kubernetes-validate", "tensorboard", "kornia", "imagehash", "prometheus-client"}
    extras = project["optional-dependencies"]
    assert {"serve", "embedded", "train", "eval", "bench", "gpu", "int8"} <= set(extras)
    installed = re.search(r'pip install --quiet -e "\.\[([^\]]+)\]"', (ROOT / "Makefile").read_text()).group(1).split(",")
    assert set(extras) - set(installed) == {"gpu", "serve", "openvino"}  # serve is the core; openvino is in bench
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    # the serving image installs the core alone; only the builder image's build arguments add an extra
    assert 'ARG KILN_EXTRAS=""' in docker and 'ARG WITH_TENSORRT=""' in docker and "/opt/kiln[" not in docker
    target = re.search(r'pip install --no-cache-dir ("/opt/kiln[^"]*")', docker).group(1)
    for extras, expanded in (("", "/opt/kiln"), ("embedded", "/opt/kiln[embedded]")):
        shell = subprocess.run(["sh", "-c", f"KILN_EXTRAS={extras!r}; echo {target}"], capture_output=True, text=True)
        assert shell.stdout.strip() == expanded, (extras, shell.stdout, shell.stderr)


def test_the_serving_path_draws_an_image_without_any_extra(repo_dir, tiny_model, tmp_path):
    from kiln.model_repository.configs import parse_pbtxt

    repo = repo_dir("epsilon")
    settings = parse_pbtxt((repo / "pipeline" / "config.pbtxt").read_text()).parameters["kiln_settings"].string_value
    out = tmp_path / "image.npy"
    run = subprocess.run([sys.executable, "-c", SERVE, ",".join(EXTRA_MODULES), str(repo), str(tiny_model("epsilon")),
                          settings, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    image = np.load(out)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    json.loads(settings)  # what the subprocess was given is the repository's own
