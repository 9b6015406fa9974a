"""`kiln bench --perf-analyzer-input OUT`: perf_analyzer's input data for the public ensemble and for
the BLS pipeline alone, and a Model Analyzer configuration naming the BLS composing models. Each
request in the files is sent to a real server as perf_analyzer would send it, and answered."""

import json

import numpy as np
import pytest
import yaml

from kiln.pipeline.request import NUMPY_DTYPES


def _inputs(module, entry: dict, config_inputs: dict, batched: bool) -> list:
    inputs = []
    for name, tensor in entry.items():
        datatype = config_inputs[name]
        array = np.array([v.encode() if isinstance(v, str) else v for v in tensor["content"]],
                         dtype=NUMPY_DTYPES[datatype]).reshape(tensor["shape"])
        array = array[None] if batched else array  # perf_analyzer adds the batch dimension (-b 1)
        value = module.InferInput(name, list(array.shape), datatype)
        value.set_data_from_numpy(array)
        inputs.append(value)
    return inputs


@pytest.mark.triton
def test_the_files_hold_requests_a_server_answers(triton, onnx_dir, tmp_path):
    import tritonclient.grpc as grpcclient
    from typer.testing import CliRunner

    from kiln.cli import app

    result = CliRunner().invoke(app, ["bench", "unused", str(onnx_dir("epsilon")), "--perf-analyzer-input", str(tmp_path),
                                      "--steps", "2"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "model-analyzer.yaml").read_text())
    assert config["bls_composing_models"] == "text_encoder,unet,vae_decoder"
    assert config["profile_models"]["pipeline"]["perf_analyzer_flags"]["input-data"] == "pipeline.json"
    info = triton()
    client = grpcclient.InferenceServerClient(info.grpc_url)
    for model, batched in (("txt2img", False), ("pipeline", True)):
        metadata = client.get_model_metadata(model, as_json=True)
        types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        entries = json.loads((tmp_path / f"{model}.json").read_text())["data"]
        assert len(entries) == 4
        for entry in entries:
            result = client.infer(model, _inputs(grpcclient, entry, types, batched))
            image = result.as_numpy("image")
            assert image.dtype == np.uint8 and image.shape[-1] == 3, model
    assert "model-analyzer profile -f model-analyzer.yaml" in (tmp_path / "README.md").read_text()
