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


class KilnClient:
    def __init__(self, url: str | None = None, protocol: str = "http", model: str = PUBLIC_MODEL, timeout_s: float = 600.0):
        if protocol not in PROTOCOLS:
            raise ClientError(f"protocol={protocol!r} is not supported: expected one of {PROTOCOLS}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
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
            raise ClientError(f"{what} failed at {self.protocol}://{self.url}: {e.message()}") from None
        except (ConnectionError, OSError) as e:
            raise ClientError(
                f"cannot reach the server at {self.protocol}://{self.url}: {e}",
                hint="start one with: kiln serve REPO_DIR --background",
            ) from None

    def request_inputs(self, **values) -> list:
        """Triton input tensors for the given request fields; absent fields take the server's defaults."""
        known = {f.name: f for f in TXT2IMG_INPUTS}
        unknown = set(values) - set(known)
        if unknown:
            raise ClientError(f"unknown request fields {sorted(unknown)}: expected {sorted(known)}")
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            field = known[name]
            if field.datatype == "BYTES":
                array = np.array([str(value).encode("utf-8")], dtype=np.object_)
            else:
                array = np.array([value], dtype=NUMPY_DTYPES[field.datatype])
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
    ) -> Generation:
        inputs = self.request_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            scheduler=scheduler,
        )
        outputs = [self._module.InferRequestedOutput(name) for name, _, _ in TXT2IMG_OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        start = time.perf_counter()
        result = self._call("generate", self._client.infer, self.model, inputs, outputs=outputs, **kwargs)
        seconds = time.perf_counter() - start
        return Generation(result.as_numpy("image"), [int(s) for s in result.as_numpy("seeds")], seconds)

    def health(self) -> dict[str, bool]:
        return {
            "live": bool(self._call("health", self._client.is_server_live)),
            "ready": bool(self._call("health", self._client.is_server_ready)),
        }

    def models(self) -> list[dict]:
        """The repository index: name, version and state of every model."""
        if self.protocol == "grpc":
            index = self._call("models", self._client.get_model_repository_index, as_json=True).get("models", [])
        else:
            index = self._call("models", self._client.get_model_repository_index)
        return [{"name": m.get("name"), "version": m.get("version", ""), "state": m.get("state", "")} for m in index]

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
