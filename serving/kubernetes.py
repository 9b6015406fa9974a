"""`kiln cluster render` / `make deploy TARGET=k8s`: Kubernetes manifests for Kiln on NVIDIA's Triton
container: one Triton per GPU (a Deployment whose pods each ask for `gpus_per_pod` GPUs), a Service,
readiness, liveness and startup probes on Triton's health endpoints, the model repository from
object storage (Triton reads s3:// and gs:// itself) or a volume claim, and autoscaling on Triton's
queue time per request through Prometheus (a ServiceMonitor and a prometheus-adapter rule). With
engines='build', an init container builds TensorRT engines on the pod's GPU into the repository's
claim (kept per runtime, reused on restart) and writes the repository Triton serves.

The manifests are validated offline against the Kubernetes JSON schemas (kubernetes-validate);
the two monitoring.coreos.com / adapter pieces are CRD-shaped and checked for their required keys.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.errors import ServeError
from kiln.serving.server import RESTRICTED_APIS

log = logging.getLogger("kiln.serving")

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # the base of deploy/Dockerfile
KUBERNETES_VERSION = "1.30.0"  # schemas the manifests are validated against
QUEUE_METRIC = "kiln_queue_ms_per_request"
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


ENGINE_MODES = ("prebuilt", "build")
BUILD_MOUNT = "/kiln"  # the repository's claim, in the engine-building init container
BUILD_ONNX = "onnx"  # the claim's ONNX export (a kiln export onnx or qdq folder)
BUILD_ENGINES = "engines"  # the claim's engine store (kiln export trt --reuse)
SCRATCH_MOUNT = "/run/kiln"  # the pod's own volume: the repository built at start, engines copied in
BUILT_REPOSITORY = f"{SCRATCH_MOUNT}/repository"


class ClusterError(ServeError):
    """A cluster setting is invalid, or a rendered manifest fails the Kubernetes schema."""


@dataclass(frozen=True)
class ClusterSpec:
    image: str = "kiln-triton:latest"  # built from deploy/Dockerfile and pushed to your registry
    repository: str = "s3://models/kiln/repository"  # s3://..., gs://... or pvc:CLAIM (a volume with the repository)
    name: str = "kiln"
    namespace: str = "kiln"
    min_replicas: int = 1
    max_replicas: int = 8
    gpus_per_pod: int = 1  # one Triton per GPU; set to the node's GPU count for one Triton per node
    queue_target_ms: float = 50.0  # scale out when the mean queue time per generation exceeds this
    admin_secret: str = "kiln-admin-key"  # Secret with key `key`: the model-control API's admin key
    storage_secret: str = "kiln-object-store"  # Secret with the object store's credentials (s3/gs)
    cpu: str = "8"
    memory: str = "32Gi"
    # prebuilt: the repository holds its models (ONNX, or engines built elsewhere on the same GPU and
    # TensorRT). build: an init container builds TensorRT engines on the pod's own GPU into the
    # repository's claim (ONNX export at onnx/, engines kept per runtime under engines/), reused on
    # restart, then writes the repository Triton serves into the pod's scratch volume.
    engines: str = "prebuilt"
    builder_image: str = "kiln-triton-builder:latest"  # deploy/Dockerfile with TensorRT's Python module (see README)
    engine_precision: str = "fp16"  # fp32 | fp16 | int8 (int8: the claim's onnx/ is a kiln export qdq folder)
    engine_profiles: tuple[str, ...] = ()  # kiln export trt --profile values (default: its own)

    def validate(self) -> "ClusterSpec":
        if not self.image.strip():
            raise ClusterError("image is empty", hint="--image REGISTRY/kiln-triton:TAG (built from deploy/Dockerfile)")
        if not re.match(r"^(s3://|gs://|pvc:)\S+$", self.repository):
            raise ClusterError(f"repository={self.repository!r} is invalid: expected s3://BUCKET/PATH, gs://BUCKET/PATH or pvc:CLAIM")
        for field in ("name", "namespace", "admin_secret", "storage_secret"):
            value = getattr(self, field)
            if not NAME.fullmatch(value) or len(value) > 63:
                raise ClusterError(f"{field}={value!r} is invalid: expected a DNS label (lower-case letters, digits, -)")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ClusterError(f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas} are invalid: "
                               "expected 1 <= min <= max")
        if self.gpus_per_pod < 1:
            raise ClusterError(f"gpus_per_pod={self.gpus_per_pod} is invalid: expected at least 1")
        if not self.queue_target_ms > 0:
            raise ClusterError(f"queue_target_ms={self.queue_target_ms} is invalid: expected a positive number")
        self._validate_engines()
        return self

    def _validate_engines(self) -> None:
        if self.engines not in ENGINE_MODES:
            raise ClusterError(f"engines={self.engines!r} is invalid: expected one of {list(ENGINE_MODES)}",
                               hint="--engines build: TensorRT engines built on each pod's GPU at first start")
        if self.engines == "prebuilt":
            changed = [f for f in ("builder_image", "engine_precision", "engine_profiles")
                       if getattr(self, f) != getattr(ClusterSpec, f)]
            if changed:
                raise ClusterError(f"{', '.join(changed)} apply to engines='build', not engines='prebuilt'",
                                   hint="add --engines build, or leave them out")
            return
        if not self.repository.startswith("pvc:"):
            raise ClusterError(f"repository={self.repository!r} cannot be used with engines='build': the engines are "
                               "built into a volume claim", hint="--repository pvc:CLAIM, a claim holding the ONNX "
                               f"export at {BUILD_ONNX}/ (ReadWriteMany when pods span nodes)")
        if not self.builder_image.strip():
            raise ClusterError("builder_image is empty", hint="--builder-image REGISTRY/kiln-triton-builder:TAG "
                               "(deploy/Dockerfile built with --build-arg WITH_TENSORRT=1)")
        if self.engine_precision not in ("fp32", "fp16", "int8"):
            raise ClusterError(f"engine_precision={self.engine_precision!r} is invalid: expected fp32, fp16 or int8")
        from kiln.errors import ExportError
        from kiln.export.tensorrt import parse_profile

        for profile in self.engine_profiles:
            try:
                parse_profile(profile, 1)  # the syntax here; the model's size multiple when the engines are planned
            except ExportError as exc:
                raise ClusterError(f"engine_profiles: {exc}", hint=exc.hint) from None


def _labels(spec: ClusterSpec) -> dict:
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/part-of": "kiln"}


def _meta(spec: ClusterSpec, name: str | None = None) -> dict:
    return {"name": name or spec.name, "namespace": spec.namespace, "labels": _labels(spec)}


def triton_args(spec: ClusterSpec) -> list[str]:
    if spec.engines == "build":
        repository = BUILT_REPOSITORY
    else:
        repository = "/models" if spec.repository.startswith("pvc:") else spec.repository
    return [
        "tritonserver",
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-restricted-api={RESTRICTED_APIS}:admin-key=$(KILN_ADMIN_KEY)",
        f"--grpc-restricted-protocol={RESTRICTED_APIS}:admin-key=$(KILN_ADMIN_KEY)",
        "--allow-metrics=true",
        "--allow-gpu-metrics=true",
        "--metrics-config=summary_latencies=true",  # p50/p90/p99 per model (the dashboard's latency panel)
        "--metrics-port=8002",
        "--exit-on-error=true",
    ]


def deployment(spec: ClusterSpec) -> dict:
    env = [{"name": "KILN_ADMIN_KEY", "valueFrom": {"secretKeyRef": {"name": spec.admin_secret, "key": "key"}}}]
    volumes, mounts = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}], [{"name": "shm", "mountPath": "/dev/shm"}]
    if spec.engines == "build":  # the init container writes the repository into the pod's scratch volume
        volumes += [{"name": "kiln-build", "persistentVolumeClaim": {"claimName": spec.repository[4:]}},
                    {"name": "scratch", "emptyDir": {}}]
        mounts.append({"name": "scratch", "mountPath": SCRATCH_MOUNT, "readOnly": True})
    elif spec.repository.startswith("pvc:"):
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.repository[4:], "readOnly": True}})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    else:  # Triton reads object storage itself; credentials from the storage Secret
        env.extend({"name": var, "valueFrom": {"secretKeyRef": {"name": spec.storage_secret, "key": var, "optional": True}}}
                   for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                               "GOOGLE_APPLICATION_CREDENTIALS"))
    container = {
        "name": "triton",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": triton_args(spec),
        "env": env,
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8001},
                  {"name": "metrics", "containerPort": 8002}],
        "resources": _resources(spec),
        # loading (and on first start, TensorRT's accelerator builds) takes minutes: the startup probe allows 20
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec),
        "spec": {
            "replicas": spec.min_replicas,
            "selector": {"matchLabels": _labels(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": _labels(spec),
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8002"}},
                "spec": {
                    **({"initContainers": [engine_builder(spec)]} if spec.engines == "build" else {}),
                    "containers": [container],
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": 60,
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                   "whenUnsatisfiable": "ScheduleAnyway",
                                                   "labelSelector": {"matchLabels": _labels(spec)}}],
                },
            },
        },
    }


def _resources(spec: ClusterSpec) -> dict:
    amounts = {"nvidia.com/gpu": spec.gpus_per_pod, "cpu": spec.cpu, "memory": spec.memory}
    return {"limits": dict(amounts), "requests": dict(amounts)}


def engine_builder(spec: ClusterSpec) -> dict:
    """The init container of engines='build': `kiln export trt --reuse` keeps the claim's engines that
    fit this pod's TensorRT and GPU (a restart builds nothing) or builds them on this GPU from the
    claim's ONNX export, then writes the ngc repository Triton serves. It asks for the GPUs Triton
    asks for; the kubelet hands an init container's devices on to the pod's containers."""
    precision = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"]}[spec.engine_precision]
    profiles = [arg for profile in spec.engine_profiles for arg in ("--profile", profile)]
    return {
        "name": "engines",
        "image": spec.builder_image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["kiln", "export", "trt", f"{BUILD_MOUNT}/{BUILD_ONNX}", f"{BUILD_MOUNT}/{BUILD_ENGINES}", *precision,
                 *profiles, "--reuse", "--repository", BUILT_REPOSITORY],
        "resources": _resources(spec),
        "volumeMounts": [{"name": "kiln-build", "mountPath": BUILD_MOUNT},
                         {"name": "scratch", "mountPath": SCRATCH_MOUNT}],
    }


def service(spec: ClusterSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec),
        "spec": {"selector": _labels(spec), "type": "ClusterIP",
                 "ports": [{"name": n, "port": p, "targetPort": n} for n, p in (("http", 8000), ("grpc", 8001), ("metrics", 8002))]},
    }


def autoscaler(spec: ClusterSpec) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                                  "target": {"type": "AverageValue", "averageValue": f"{spec.queue_target_ms:g}"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def disruption_budget(spec: ClusterSpec) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(spec),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(spec)}}}


def adapter_rules(spec: ClusterSpec) -> dict:
    """prometheus-adapter rule: Triton's cumulative queue time over successful requests of the BLS
    pipeline(s), per pod, in milliseconds per generation over the last minute."""
    rule = f"""rules:
- seriesQuery: 'nv_inference_queue_duration_us{{namespace!="",pod!="",model=~"pipeline.*"}}'
  resources:
    overrides:
      namespace: {{resource: "namespace"}}
      pod: {{resource: "pod"}}
  name:
    as: "{QUEUE_METRIC}"
  metricsQuery: 'sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>,model=~"pipeline.*"}}[1m])) by (<<.GroupBy>>) / clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>,model=~"pipeline.*"}}[1m])) by (<<.GroupBy>>), 1e-9) / 1000'
"""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.name}-prometheus-adapter-rules"),
            "data": {"config.yaml": rule}}


def service_monitor(spec: ClusterSpec) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": _meta(spec),
            "spec": {"selector": {"matchLabels": _labels(spec)}, "endpoints": [{"port": "metrics", "interval": "15s"}]}}


def grafana_dashboard(spec: ClusterSpec) -> dict:
    """serving.dashboard's Grafana dashboard in a ConfigMap labelled for Grafana's dashboard sidecar
    (`grafana_dashboard: "1"`, the kube-prometheus-stack convention); also written as a JSON file to import."""
    from kiln.serving.dashboard import dashboard

    meta = _meta(spec, f"{spec.name}-grafana-dashboard")
    meta["labels"] = {**meta["labels"], "grafana_dashboard": "1"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {DASHBOARD_FILE: json.dumps(dashboard(f"Kiln on Triton ({spec.name})"), indent=1)}}


DASHBOARD_FILE = "grafana-dashboard.json"


def manifests(spec: ClusterSpec) -> dict[str, dict]:
    spec.validate()
    return {
        "grafana-dashboard.yaml": grafana_dashboard(spec),
        "deployment.yaml": deployment(spec),
        "service.yaml": service(spec),
        "hpa.yaml": autoscaler(spec),
        "pdb.yaml": disruption_budget(spec),
        "prometheus-adapter-rules.yaml": adapter_rules(spec),
        "servicemonitor.yaml": service_monitor(spec),
    }


CRD_REQUIRED = {"ServiceMonitor": ("spec.selector", "spec.endpoints")}


def validate_manifest(manifest: dict, version: str = KUBERNETES_VERSION) -> str:
    """Kubernetes' own schema (strict: unknown fields are errors); CRDs: their required keys."""
    import kubernetes_validate

    kind = manifest.get("kind")
    if kind in CRD_REQUIRED:
        for path in CRD_REQUIRED[kind]:
            node = manifest
            for key in path.split("."):
                if not isinstance(node, dict) or key not in node:
                    raise ClusterError(f"{kind} {manifest['metadata']['name']}: {path} is missing")
                node = node[key]
        return "crd"
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ClusterError(f"{kind} {manifest['metadata']['name']} fails the Kubernetes {version} schema: "
                           f"{exc.message} at {'/'.join(map(str, exc.path))}") from None
    return "schema"


def render(spec: ClusterSpec, out_dir: Path) -> dict[str, Path]:
    """Write every manifest (validated first) and a kustomization listing them; returns the paths."""
    import yaml

    from kiln.artifacts import write_folder_atomically

    rendered = manifests(spec)
    for manifest in rendered.values():
        validate_manifest(manifest)
    with write_folder_atomically(Path(out_dir)) as tmp:
        for name, manifest in rendered.items():
            (tmp / name).write_text(yaml.safe_dump(manifest, sort_keys=False))
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "namespace": spec.namespace, "resources": list(rendered)}
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        (tmp / "cluster.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        (tmp / DASHBOARD_FILE).write_text(rendered["grafana-dashboard.yaml"]["data"][DASHBOARD_FILE] + "\n")
    log.info("Kubernetes manifests for %s written to %s", spec.image, out_dir)
    return {name: Path(out_dir) / name for name in rendered}
