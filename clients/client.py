"""One Python API over Triton's HTTP and gRPC protocols for Kiln's txt2img endpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ClientError
from kiln.pipeline.request import NUMPY_DTYPES, TXT2IMG_INPUTS, TXT2IMG_OUTPUTS

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
PUBLIC_MODEL = "txt2img"
WIRE_RANGES = {"INT32": (-2**31, 2**31 - 1), "INT64": (-2**63, 2**63 - 1)}  # numpy would wrap anything outside


@dataclass
class Generation:
    images: np.ndarray  # (N, H, W, 3) uint8
    seeds: list[int]
    seconds: float

    def save(self, path: Path) -> list[Path]:
        """Write each image as PNG: `path` itself for one image, `stem-i.png` beside it for several."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(self.images) == 1:
            targets = [path]
        else:
            targets = [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(self.images))]
        for image, target in zip(self.images, targets):
            Image.fromarray(image).save(target)
        return targets


def _pair(names: tuple[str, str], values: tuple[int, int] | None) -> dict:
    return {} if values is None else dict(zip(names, values, strict=True))


_BATCHED: dict[tuple[str, str, str], bool] = {}  # (protocol, url, model) -> whether it takes a batch dimension


class KilnClient:
    def __init__(self, url: str | None = None, protocol: str = "http", model: str = PUBLIC_MODEL, timeout_s: float = 600.0,
                 admin_key: str | None = None):
        if protocol not in PROTOCOLS:
            raise ClientError(f"protocol={protocol!r} is not supported: expected one of {PROTOCOLS}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
        self.admin_key = admin_key
        if protocol == "http":
            import tritonclient.http as module

            self._client = module.InferenceServerClient(
                self.url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(self.url)
        self._module = module

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            status = str(e.status() or "")
            raise ClientError(f"{what} failed at {self.protocol}://{self.url}: {e.message()}", detail=e.message(),
                              rejected=status in ("400", "StatusCode.INVALID_ARGUMENT"), status=status) from None
        except TimeoutError as e:  # the server answered too slowly: it is reachable, so do not say otherwise
            raise ClientError(f"{what} at {self.protocol}://{self.url}: timed out ({e or 'no answer in time'})",
                              hint="raise the client's timeout_s, or ask for fewer steps, images or pixels") from None
        except (ConnectionError, OSError) as e:
            raise ClientError(
                f"cannot reach the server at {self.protocol}://{self.url}: {e}",
                hint="start one with: kiln serve REPO_DIR --background", unreachable=True,
            ) from None

    def batched(self) -> bool:
        """Whether the model takes a batch dimension before each input (the `pipeline` model, which a client
        calls directly so that its cancellation reaches the loop); txt2img's ensemble does not. Asked once."""
        key = (self.protocol, self.url, self.model)
        if key not in _BATCHED:  # once a process: a client made per request (the gateway's) asks no more
            try:
                config = self._client.get_model_config(self.model, **({"as_json": True} if self.protocol == "grpc" else {}))
                config = config.get("config", config)
                _BATCHED[key] = int(config.get("max_batch_size", config.get("maxBatchSize", 0)) or 0) > 0
            except Exception:  # noqa: BLE001 - an unknown model or an unreachable server: generate's call says which
                return False
        return _BATCHED[key]

    def request_inputs(self, batched: bool = False, **values) -> list:
        """Triton input tensors for the given request fields; absent fields take the server's defaults.
        `batched`: with the batch dimension of one request before each (KilnClient.batched)."""
        known = {f.name: f for f in TXT2IMG_INPUTS}
        unknown = set(values) - set(known)
        if unknown:
            raise ClientError(f"unknown request fields {sorted(unknown)}: expected {sorted(known)}")
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            field = known[name]
            values = list(value) if field.many and isinstance(value, (list, tuple)) else [value]
            if not values:
                raise ClientError(f"{name}=[] cannot be sent: expected at least one value (or leave it out)")
            low, high = WIRE_RANGES.get(field.datatype, (None, None))
            for item in values:
                if low is not None and (isinstance(item, bool) or not isinstance(item, (int, np.integer))
                                        or not low <= item <= high):
                    raise ClientError(f"{name}={item!r} cannot be sent: expected an integer in [{low}, {high}] "
                                      f"({field.datatype} on the wire; the server states its own narrower range)")
                if field.datatype == "FP32" and (isinstance(item, bool) or not isinstance(item, (int, float, np.number))):
                    raise ClientError(f"{name}={item!r} cannot be sent: expected a number")
            if field.datatype == "BYTES":
                array = np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=np.object_)
            else:
                array = np.array(values, dtype=NUMPY_DTYPES[field.datatype])
            if batched:
                array = array[None]
            tensor = self._module.InferInput(name, list(array.shape), field.datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        num_images: int | None = None,
        image: bytes | Path | None = None,
        strength: float | None = None,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        loras: str | dict[str, float] | None = None,
        control_image: bytes | Path | list | None = None,
        controlnet: str | list[str] | None = None,
        control_scale: float | list[float] | None = None,
        control_start: float | list[float] | None = None,
        control_end: float | list[float] | None = None,
        guidance_cutoff: float | None = None,
        guidance_start: float | None = None,
        guidance_end: float | None = None,
    ) -> Generation:
        """txt2img, or img2img when `image` (encoded PNG/JPEG bytes or a file path) is given.
        `original_size`, `crop_top_left`, `target_size` ((height, width), (top, left)): SDXL's size
        conditioning (default: the generated size, no crop). `loras`: adapters registered with the
        server (kiln lora add), "name:scale,name2:scale2" or {name: scale}. `control_image`: one image
        (bytes or a path) per ControlNet of `controlnet` (names, default every one the model serves, in
        its order); `control_scale`, `control_start`, `control_end`: one value for all, or one each.
        `guidance_cutoff`, `guidance_start`, `guidance_end`: which fraction of the schedule is guided."""
        if isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        if control_image is not None:
            control_image = [Path(c).read_bytes() if isinstance(c, (str, Path)) else c
                             for c in (control_image if isinstance(control_image, (list, tuple)) else [control_image])]
        if isinstance(controlnet, (list, tuple)):
            controlnet = ",".join(controlnet)
        if isinstance(loras, dict):
            loras = ",".join(f"{name}:{scale!r}" for name, scale in loras.items())
        batched = self.batched()
        inputs = self.request_inputs(
            batched,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_cutoff=guidance_cutoff,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            height=height,
            width=width,
            scheduler=scheduler,
            num_images=num_images,
            init_image=image,
            strength=strength,
            **_pair(("original_height", "original_width"), original_size),
            **_pair(("crop_top", "crop_left"), crop_top_left),
            **_pair(("target_height", "target_width"), target_size),
            loras=loras or None,
            controlnet=controlnet,
            control_image=control_image,
            control_scale=control_scale,
            control_start=control_start,
            control_end=control_end,
        )
        outputs = [self._module.InferRequestedOutput(name) for name, _, _ in TXT2IMG_OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        start = time.perf_counter()
        try:
            result = self._call("generate", self._client.infer, self.model, inputs, outputs=outputs, **kwargs)
        except ClientError as exc:
            if "unknown model" not in str(exc):
                raise
            raise ClientError(str(exc), detail=exc.detail, status=exc.status, hint=f"this server has no model {self.model!r}: a repository serving several "
                              "models names each endpoint after its model; pass model=NAME (kiln generate --model NAME; "
                              "kiln models lists them)") from None
        seconds = time.perf_counter() - start
        return Generation(result.as_numpy("image"), [int(s) for s in result.as_numpy("seeds")], seconds)

    def health(self) -> dict[str, bool]:
        return {
            "live": bool(self._call("health", self._client.is_server_live)),
            "ready": bool(self._call("health", self._client.is_server_ready)),
        }

    def model_ready(self) -> bool:
        """Whether the server serves this client's model, ready for requests."""
        return bool(self._call("model readiness", self._client.is_model_ready, self.model))

    def _admin_headers(self) -> dict[str, str]:
        from kiln.serving.server import ADMIN_HEADER

        if not self.admin_key:
            raise ClientError("the model-repository API needs the server's admin key",
                              hint="pass --admin-key (kiln serve keeps it in ~/.cache/kiln/run/triton-PORT.admin-key)")
        # Triton's gRPC front end prefixes restricted-protocol headers with triton-grpc-protocol-.
        name = ADMIN_HEADER if self.protocol == "http" else f"triton-grpc-protocol-{ADMIN_HEADER}"
        return {name: self.admin_key}

    def models(self) -> list[dict]:
        """The repository index: name, version and state of every model (a protected API)."""
        headers = self._admin_headers()
        if self.protocol == "grpc":
            index = self._call("models", self._client.get_model_repository_index, headers=headers, as_json=True)
            index = index.get("models", [])
        else:
            index = self._call("models", self._client.get_model_repository_index, headers=headers)
        return [{"name": m.get("name"), "version": m.get("version", ""), "state": m.get("state", "")} for m in index]

    def load_model(self, name: str) -> None:
        self._call(f"load {name}", self._client.load_model, name, headers=self._admin_headers())

    def unload_model(self, name: str, wait: bool = True) -> None:
        """Triton answers an unload before the model has finished unloading; with `wait`, return only
        once the repository index no longer shows it UNLOADING (bounded by the client's timeout)."""
        self._call(f"unload {name}", self._client.unload_model, name, headers=self._admin_headers())
        deadline = time.monotonic() + self.timeout_s
        while wait and time.monotonic() < deadline:
            if all(m["state"] != "UNLOADING" for m in self.models() if m["name"] == name):
                return
            time.sleep(0.05)
        if wait:
            raise ClientError(f"{name} was still unloading after {self.timeout_s:.0f} s at {self.protocol}://{self.url}")

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
