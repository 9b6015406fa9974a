"""The GPU and cluster target, checked on the CPU: NGC configs against Triton's schema, TensorRT
engine planning and stale-engine refusal, several models in one repository with shared components
(served for real), the DLPack path of the BLS loop (served for real, device cpu). On a GPU host the
`gpu`-marked tests also serve that loop on cuda and build TensorRT engines; here they are skipped."""

import json
import shutil

import numpy as np
import pytest

from kiln.clients.client import KilnClient
from kiln.errors import ExportError, RepositoryError
from kiln.export.specs import COMPONENTS, ModelDims
from kiln.export.tensorrt import Runtime, check_engines, engine_manifest, parse_profile, plan_engines
from kiln.artifacts import write_json_atomically
from kiln.model_repository import configs
from kiln.model_repository.builder import build_models_repository, build_repository
from kiln.serving import server
from test_engine_runtime import H100, write_engine_folder

REQUEST = dict(prompt="a red digit 7", negative_prompt="blurry", seed=3, steps=4, guidance_scale=6.0, height=64, width=64,
               scheduler="euler_a")


def _config(repo, name):
    return configs.parse_pbtxt((repo / name / "config.pbtxt").read_text())


# ------------------------------------------------------------------ NGC configs


@pytest.mark.parametrize("accelerator", ["cuda", "tensorrt"])
def test_ngc_onnxruntime_configs(onnx_dir, tmp_path, accelerator):
    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo", target="ngc",
                            tuning=configs.Tuning(ort_accelerator=accelerator))
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["target"] == "ngc" and manifest["backend"] == "onnxruntime"
    for name in manifest["models"]:
        assert _config(repo, name).name == name  # every file parses with Triton's schema
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        config = _config(repo, name)
        assert config.platform == "onnxruntime_onnx" and not config.backend
        assert config.default_model_filename == "model.onnx" and (repo / name / "1" / "model.onnx").is_file()
        assert [g.kind for g in config.instance_group] == [configs.mc.ModelInstanceGroup.KIND_GPU]
        assert [i.name for i in config.input] == COMPONENTS[name].input_names
        assert [o.name for o in config.output] == COMPONENTS[name].output_names
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if accelerator == "tensorrt":
            assert [a.name for a in accelerators] == ["tensorrt"]
            # the VAE stays fp32 (fp16 VAEs decode to black); the others run fp16
            expected = "FP32" if name.startswith("vae") else "FP16"
            assert accelerators[0].parameters["precision_mode"] == expected
        else:
            assert not accelerators
    pipeline = _config(repo, "pipeline")
    assert pipeline.backend == "python"
    assert pipeline.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert [g.kind for g in pipeline.instance_group] == [configs.mc.ModelInstanceGroup.KIND_GPU]
    assert json.loads(pipeline.parameters["kiln_settings"].string_value)["device"] == "cuda"


def test_ngc_tensorrt_configs_take_the_engines(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    write_engine_folder(onnx_dir("epsilon"), engines)
    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo", target="ngc", backend="tensorrt", engine_dir=engines)
    config = _config(repo, "unet")
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert (repo / "unet" / "1" / "model.plan").read_bytes() == b"unet"
    # the runtime the engines were built on travels to the pipeline, which checks it at load
    pipeline = json.loads(_config(repo, "pipeline").parameters["kiln_settings"].string_value)
    assert pipeline["engines"] == {"tensorrt": "10.3.0.26", "gpu": H100.gpu, "compute_capability": "9.0"}
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["ensembles"]["txt2img"]["engines"]["runtime"] == pipeline["engines"]
    (engines / "manifest.json").unlink()
    with pytest.raises(ExportError, match="has no engine manifest"):
        build_repository(onnx_dir("epsilon"), tmp_path / "r1", target="ngc", backend="tensorrt", engine_dir=engines)
    with pytest.raises(RepositoryError, match="needs engines"):
        build_repository(onnx_dir("epsilon"), tmp_path / "r2", target="ngc", backend="tensorrt")
    with pytest.raises(RepositoryError, match="--backend 'tensorrt' is not available for --target embedded"):
        build_repository(onnx_dir("epsilon"), tmp_path / "r3", backend="tensorrt", engine_dir=engines)


# ------------------------------------------------------------------ TensorRT planning


def test_engine_profiles_derive_from_the_specs(onnx_dir):
    plan = plan_engines(onnx_dir("epsilon"), "fp16", ["1x32:1x64:4x96"])
    dims = ModelDims(**json.loads((onnx_dir("epsilon") / "manifest.json").read_text())["dims"])
    f = dims.vae_scale_factor
    by_name = {c.component: c for c in plan.components}
    unet = by_name["unet"]
    # classifier-free guidance doubles the UNet's batch; latents are pixels / vae_scale_factor
    assert unet.profiles[0]["sample"] == [[2, dims.latent_channels, 32 // f, 32 // f], [2, dims.latent_channels, 64 // f, 64 // f],
                                     [8, dims.latent_channels, 96 // f, 96 // f]]
    assert unet.profiles[0]["encoder_hidden_states"][2] == [8, dims.sequence, dims.hidden_size]
    assert unet.profiles[0]["timestep"] == [[2], [2], [8]]
    assert by_name["text_encoder"].profiles[0]["input_ids"] == [[2, dims.sequence], [2, dims.sequence], [8, dims.sequence]]
    assert by_name["vae_decoder"].profiles[0]["latent_sample"][2] == [4, dims.latent_channels, 96 // f, 96 // f]
    assert by_name["vae_encoder"].profiles[0]["sample"][0] == [1, 3, 32, 32]
    # fp16 keeps the VAE in fp32 and the attention softmax in fp32
    assert unet.precision == "fp16" and unet.fp32_layers
    assert by_name["vae_decoder"].precision == "fp32"
    two = plan_engines(onnx_dir("epsilon"), "fp16", ["1x32:1x64:1x64", "2x64:4x64:4x96"])
    two_unet = {c.component: c for c in two.components}["unet"]
    assert len(two_unet.profiles) == 2 and two_unet.profiles[1]["sample"][2] == [8, dims.latent_channels, 96 // f, 96 // f]


@pytest.mark.parametrize("text, message", [
    ("1x64:1x64", "expected IMAGESxSIZE"),
    ("1x60:1x64:1x64", "not a positive multiple"),
    ("4x64:1x64:1x64", "min <= opt <= max"),
    ("1xbig:1x64:1x64", "is not IMAGESxSIZE"),
])
def test_bad_profiles_name_the_fix(text, message):
    with pytest.raises(ExportError, match=message):
        parse_profile(text, 16)


def test_stale_engines_are_refused(onnx_dir, tmp_path):
    plan = plan_engines(onnx_dir("epsilon"), "fp16")
    built = Runtime("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    write_json_atomically(tmp_path / "manifest.json", engine_manifest(plan, built, {}))
    assert check_engines(tmp_path, built, plan.export_key)["runtime"]["gpu"] == built.gpu
    with pytest.raises(ExportError, match="built with gpu 'NVIDIA H100 80GB HBM3'"):
        check_engines(tmp_path, Runtime("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0"))
    with pytest.raises(ExportError, match="built with tensorrt '10.3.0'"):
        check_engines(tmp_path, Runtime("10.5.0", built.gpu, "9.0"))
    with pytest.raises(ExportError, match="another ONNX export"):
        check_engines(tmp_path, built, "0" * 64)
    with pytest.raises(ExportError, match="no engine manifest"):
        check_engines(tmp_path / "nothing", built)


@pytest.mark.gpu
def test_tensorrt_engines_build_pass_their_check_and_are_keyed_to_this_gpu(onnx_dir, tmp_path):
    """`kiln export trt` on the tiny export: every component builds, each engine's outputs are the
    spec's and agree with ONNX Runtime within the spec's tolerance, and the manifest ties the engines
    to this TensorRT, this GPU and this export."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (make gpu-setup)")
    from kiln.export.tensorrt import ENGINE_NAME, export_engines, trt_parity_check

    plan = plan_engines(onnx_dir("epsilon"), "fp16")
    out = export_engines(onnx_dir("epsilon"), tmp_path / "engines", plan, parity_check=trt_parity_check)
    runtime = Runtime.detect()
    manifest = check_engines(out, runtime, plan.export_key)
    assert sorted(manifest["parity"]) == sorted(c.component for c in plan.components) == sorted(COMPONENTS)
    for component, report in manifest["parity"].items():
        assert report["bytes"] == (out / component / ENGINE_NAME).stat().st_size > 0
        checked = {name: r for name, r in report.items() if isinstance(r, dict)}
        assert sorted(checked) == sorted(COMPONENTS[component].output_names), component
        for name, r in checked.items():
            assert r["finite"] and r["rel_l2"] <= r["tolerance_rel_l2"], (component, name, r)
    assert manifest["parity"]["unet"]["fp32_layers"] > 0  # the attention softmax stays fp32 under fp16
    with pytest.raises(ExportError, match="another ONNX export"):
        check_engines(out, runtime, "0" * 64)


# ------------------------------------------------------------------ several models, served


@pytest.fixture(scope="module")
def two_models(onnx_dir, tmp_path_factory):
    """`base` and `tuned`: the same export except the UNet (a fine-tune that touched only the UNet)."""
    from kiln.export.onnx_export import export_onnx
    from kiln.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("two")
    other = export_onnx(write_tiny_model(root / "other", "epsilon", seed=1), root / "other-onnx").out_dir
    tuned = root / "tuned"
    shutil.copytree(onnx_dir("epsilon"), tuned)
    shutil.rmtree(tuned / "unet")
    shutil.copytree(other / "unet", tuned / "unet")
    return {"base": onnx_dir("epsilon"), "tuned": tuned}


def test_identical_components_are_stored_once(two_models, tmp_path):
    repo = build_models_repository(two_models, tmp_path / "repo")
    manifest = json.loads((repo / "manifest.json").read_text())
    base, tuned = manifest["ensembles"]["base"], manifest["ensembles"]["tuned"]
    for component in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert base["components"][component] == tuned["components"][component]
    assert base["components"]["unet"] != tuned["components"]["unet"]
    assert base["tokenizer"] == tuned["tokenizer"]
    stored = sorted(p.parent.parent.name for p in repo.glob("*/1/model.onnx"))
    assert len(stored) == 5  # 3 shared components + 2 UNets
    for name in manifest["models"]:
        assert _config(repo, name).name == name
    with pytest.raises(RepositoryError, match="model name 'unet' is invalid"):
        build_models_repository({"unet": two_models["base"], "b": two_models["tuned"]}, tmp_path / "bad")
    for clash in ("pipeline_b", "tokenizer_9b5f91dca9e2", "text_encoder_2"):  # what the repository names its own models
        with pytest.raises(RepositoryError, match=f"model name '{clash}' is invalid"):
            build_models_repository({"a": two_models["base"], clash: two_models["tuned"], "b": two_models["base"]},
                                    tmp_path / "bad")


@pytest.mark.slow  # starts a Triton server of its own
def test_several_models_served_side_by_side_and_swapped_at_run_time(two_models, repo_dir, tmp_path):
    repo = build_models_repository(two_models, tmp_path / "repo")
    with server.running_server(repo_dir("epsilon")) as single, server.running_server(repo) as multi:
        with KilnClient(single.http_url) as client:
            alone = client.generate(**REQUEST).images
        with KilnClient(multi.http_url, model="base") as client:
            assert np.array_equal(client.generate(**REQUEST).images, alone)
        with KilnClient(multi.grpc_url, "grpc", model="tuned") as client:
            tuned = client.generate(**REQUEST).images
        assert np.abs(tuned.astype(int) - alone).max() > 10  # another UNet draws another image
        admin = server.admin_key_file(multi.ports).read_text().strip()
        with KilnClient(multi.http_url, model="tuned", admin_key=admin) as client:
            client.unload_model("tuned")
            states = {m["name"]: m["state"] for m in client.models()}
            assert states["tuned"] == "UNAVAILABLE" and states["base"] == "READY"
            with pytest.raises(Exception, match="tuned"):
                client.generate(**REQUEST)
            client.load_model("tuned")
            assert np.array_equal(client.generate(**REQUEST).images, tuned)
        with KilnClient(multi.http_url, model="base") as client:
            assert np.array_equal(client.generate(**REQUEST).images, alone)


@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dlpack_bls_path_draws_the_same_images(onnx_dir, repo_dir, triton, tmp_path, device):
    """The GPU target's loop (torch tensors through DLPack, FORCE_CPU_ONLY_INPUT_TENSORS off): on device
    cpu the same images as the numpy loop; on cuda (latents and scheduler on the GPU, handed to the
    components through DLPack) the same to 2/255, as CUDA's float arithmetic rounds differently."""
    repo = build_models_repository({"txt2img": onnx_dir("epsilon")}, tmp_path / "repo", bls_device=device)
    pipeline = _config(repo, "pipeline")
    assert pipeline.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert json.loads(pipeline.parameters["kiln_settings"].string_value)["device"] == device
    with server.running_server(repo) as info:
        with KilnClient(triton("epsilon").http_url) as client:
            expected = client.generate(**REQUEST, num_images=2).images
        with KilnClient(info.http_url) as client:
            got = client.generate(**REQUEST, num_images=2).images
        assert got.shape == expected.shape == (2, 64, 64, 3)
        assert np.abs(got.astype(int) - expected).max() <= (0 if device == "cpu" else 2)


# ------------------------------------------------------------------ Kubernetes


def test_cluster_manifests_pass_the_kubernetes_schemas(tmp_path):
    import yaml

    from kiln.serving.kubernetes import ClusterSpec, render, validate_manifest

    paths = render(ClusterSpec(image="registry.example/kiln-triton:1", repository="pvc:kiln-models", gpus_per_pod=2,
                               max_replicas=4), tmp_path / "k8s")
    docs = {name: yaml.safe_load(path.read_text()) for name, path in paths.items()}
    assert {d["kind"] for d in docs.values()} == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                                  "ConfigMap", "ServiceMonitor"}
    checked = {d["kind"]: validate_manifest(d) for d in docs.values()}  # from the files, as kubectl would read them
    assert checked["Deployment"] == "schema" and checked["ServiceMonitor"] == "crd"
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-repository=/models" in container["args"]
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):  # every admin surface needs the key
        assert f"{flag}=model-repository,shared-memory,trace,logging:admin-key=$(KILN_ADMIN_KEY)" in container["args"]
    assert not any(a.startswith("--cache-config") for a in container["args"])  # Triton's cache replays errors
    hpa = docs["hpa.yaml"]["spec"]
    assert hpa["maxReplicas"] == 4 and hpa["metrics"][0]["pods"]["metric"]["name"] == "kiln_queue_ms_per_request"
    assert "nv_inference_queue_duration_us" in docs["prometheus-adapter-rules.yaml"]["data"]["config.yaml"]
    board = json.loads(docs["grafana-dashboard.yaml"]["data"]["grafana-dashboard.json"])
    assert docs["grafana-dashboard.yaml"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads((tmp_path / "k8s" / "grafana-dashboard.json").read_text()) == board
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    assert "rate(kiln_unet_ms[1m])" in exprs and 'nv_inference_request_summary_us{quantile="0.99"}' in exprs
    kustomization = yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(paths)
    s3 = render(ClusterSpec(repository="s3://bucket/kiln"), tmp_path / "s3")
    args = yaml.safe_load(s3["deployment.yaml"].read_text())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--model-repository=s3://bucket/kiln" in args


def test_the_schema_check_can_fail():
    from kiln.serving.kubernetes import ClusterError, ClusterSpec, manifests, validate_manifest

    deployment = manifests(ClusterSpec())["deployment.yaml"]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(ClusterError, match="containerPort"):
        validate_manifest(deployment)
    service = manifests(ClusterSpec())["service.yaml"]
    service["spec"]["sessionAffinityTypo"] = "ClientIP"  # strict: unknown fields are errors
    with pytest.raises(ClusterError, match="Service kiln fails"):
        validate_manifest(service)


@pytest.mark.parametrize("field, value, message", [
    ("repository", "http://x/models", "repository='http://x/models' is invalid"),
    ("namespace", "Kiln_Prod", "namespace='Kiln_Prod' is invalid"),
    ("min_replicas", 5, "expected 1 <= min <= max"),
    ("image", " ", "image is empty"),
])
def test_cluster_settings_are_checked_before_rendering(field, value, message, tmp_path):
    from dataclasses import replace

    from kiln.serving.kubernetes import ClusterError, ClusterSpec, render

    with pytest.raises(ClusterError, match=message):
        render(replace(ClusterSpec(max_replicas=4), **{field: value}), tmp_path / "k8s")
    assert not (tmp_path / "k8s").exists()


def test_engines_built_at_first_start_by_an_init_container(tmp_path):
    """--engines build: an init container on the pod's GPUs runs kiln export trt --reuse from the claim's
    ONNX export into its engine store, then writes the repository into the pod's scratch volume, which
    Triton serves read-only; the manifests pass the Kubernetes schemas."""
    import yaml

    from kiln.serving.kubernetes import ClusterSpec, render, validate_manifest

    spec = ClusterSpec(image="registry.example/kiln-triton:1", repository="pvc:kiln-models", engines="build",
                       builder_image="registry.example/kiln-triton-builder:1", engine_precision="int8",
                       engine_profiles=("1x512:1x512:4x768",), gpus_per_pod=2)
    paths = render(spec, tmp_path / "k8s")
    deployment = yaml.safe_load(paths["deployment.yaml"].read_text())
    assert validate_manifest(deployment) == "schema"
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.example/kiln-triton-builder:1"
    assert init["args"] == ["kiln", "export", "trt", "/kiln/onnx", "/kiln/engines", "--int8",
                            "--profile", "1x512:1x512:4x768", "--reuse", "--repository", "/run/kiln/repository"]
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 2  # built on the GPUs Triton then gets
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"kiln-build": "/kiln", "scratch": "/run/kiln"}
    assert not any(m.get("readOnly") for m in init["volumeMounts"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kiln-build"]["persistentVolumeClaim"] == {"claimName": "kiln-models"} and "emptyDir" in volumes["scratch"]
    (triton,) = pod["containers"]
    assert "--model-repository=/run/kiln/repository" in triton["args"]
    assert {"name": "scratch", "mountPath": "/run/kiln", "readOnly": True} in triton["volumeMounts"]
    assert not any(m["name"] == "kiln-build" for m in triton["volumeMounts"])
    fp32 = render(ClusterSpec(repository="pvc:kiln-models", engines="build", engine_precision="fp32"), tmp_path / "fp32")
    args = yaml.safe_load(fp32["deployment.yaml"].read_text())["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert args == ["kiln", "export", "trt", "/kiln/onnx", "/kiln/engines", "--reuse", "--repository", "/run/kiln/repository"]
    prebuilt = yaml.safe_load(render(ClusterSpec(repository="pvc:kiln-models"), tmp_path / "pre")["deployment.yaml"].read_text())
    assert "initContainers" not in prebuilt["spec"]["template"]["spec"]


@pytest.mark.parametrize("settings, message", [
    (dict(engines="sometimes"), r"engines='sometimes' is invalid: expected one of \['prebuilt', 'build'\]"),
    (dict(engines="build"), r"repository='s3://models/kiln/repository' cannot be used with engines='build'"),
    (dict(engines="build", repository="pvc:m", engine_precision="int4"), "engine_precision='int4' is invalid"),
    (dict(engines="build", repository="pvc:m", builder_image=""), "builder_image is empty"),
    (dict(engines="build", repository="pvc:m", engine_profiles=("4x512:1x512:1x512",)), "engine_profiles: .*min <= opt <= max"),
    (dict(engine_precision="int8"), "engine_precision apply to engines='build', not engines='prebuilt'"),
])
def test_engine_settings_are_checked_before_rendering(settings, message, tmp_path):
    from kiln.serving.kubernetes import ClusterError, ClusterSpec, render

    with pytest.raises(ClusterError, match=message):
        render(ClusterSpec(**settings), tmp_path / "k8s")
    assert not (tmp_path / "k8s").exists()


def test_cluster_render_takes_the_engine_options(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from kiln.cli import app

    result = CliRunner().invoke(app, ["cluster", "render", str(tmp_path / "k8s"), "--repository", "pvc:kiln-models",
                                      "--engines", "build", "--engine-precision", "fp16", "--engine-profile", "1x64:1x64:2x96"])
    assert result.exit_code == 0, result.output
    init = yaml.safe_load((tmp_path / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][5:8] == ["--fp16", "--profile", "1x64:1x64:2x96"]
    assert json.loads((tmp_path / "k8s" / "cluster.json").read_text())["engines"] == "build"


def test_ngc_components_warm_up_at_load_with_inputs_their_config_accepts():
    """Triton's model_warmup on the ngc target: every input of each component, at concrete shapes that
    fit the declared dims (-1 any size), so the first request pays no engine build."""
    from kiln.export.specs import FAMILIES
    from kiln.model_repository.configs import Tuning, ngc_component_config

    dims = ModelDims(latent_channels=4, hidden_size=768, sequence=77, vocab_size=49408, vae_scale_factor=8, unet_factor=8,
                     default_latent=64, hidden_size_2=1280, pooled_size=1280, cross_attention_dim=2048)
    for family in FAMILIES.values():
        for name in family.components:
            spec = family.spec(name)
            config = ngc_component_config(spec, dims, Tuning(), "onnxruntime")
            (warmup,) = config.model_warmup
            assert warmup.batch_size == 1 and set(warmup.inputs) == {t.name for t in config.input}, name
            for declared in config.input:
                data = warmup.inputs[declared.name]
                assert data.data_type == declared.data_type and len(data.dims) == len(declared.dims), (name, declared.name)
                assert all(d == w or d == -1 for d, w in zip(declared.dims, data.dims)), (name, declared.name)
                assert data.zero_data or data.random_data
