"""LoRA adapters served at run time, over one copy of the base weights.

An export made with `--lora-inputs` gives every adaptable layer of the UNet and the text encoders two
more graph inputs, `lora_A.<module>` (r, in) and `lora_B.<module>` (out, r), and computes
`W x + b + B (A x)` with the rank r dynamic (kiln.export.wrappers.WithLoraInputs). Adaptable layers
are the ones kohya's standard LoRA trains: every linear (or 1x1 convolution) inside the UNet's
transformer blocks, and every linear of the text encoders' layers. The layers a component takes
adapters for are declared beside its ONNX file (ADAPTED_LAYERS_NAME), and everything here reads that
declaration.

A request's adapters become feeds: each adapter's A and its B times scale x alpha / rank, several
adapters concatenated along r (so they add, as diffusers' fused adapters do), and a zero rank-1 pair
for a layer no adapter touches. Nothing is copied or refitted: the base weights are shared by every
request, and an adapter costs only its own low-rank matrices.

The registry (`Registry`) is a folder in the repository beside the pipeline model: `index.json` names
the adapters; each adapter is one normalised file named by its content, `<id>.safetensors`, holding
`A.<component>.<module>` and `B.<component>.<module>` with alpha / rank already folded into B.
Requests resolve names to ids when they start, so removing or replacing an adapter never changes a
request in flight; a removed adapter's file stays for GRACE_S before it is deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ModelError, RequestError

ADAPTED_LAYERS_NAME = "adapted_layers.json"  # beside an adapted component's model.onnx
LORA_FIELD = "loras"  # the request field, and the adapted components' extra input
REGISTRY_FOLDER = "loras"  # inside the pipeline model's folder (Triton ignores non-numeric folders)
INDEX_NAME = "index.json"
MAX_SCALE = 4.0  # |scale|; A1111 users stay within about +-2
MAX_ADAPTERS = 8  # in one request
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ADAPTER_ID = re.compile(r"[0-9a-f]{16}")
GRACE_S = 600.0  # a removed adapter's file outlives any request that resolved it
SYNTAX = "name:scale pairs separated by commas, e.g. 'pixel-art:0.8,ink:0.5' (the scale defaults to 1)"


@dataclass(frozen=True)
class AdaptedLayer:
    """One layer that takes a low-rank update: `module` is its path inside the component's diffusers
    model (text encoders: from `text_model.`), `kohya` its name in kohya's files."""

    component: str
    module: str
    in_features: int
    out_features: int
    kohya: str
    conv: bool = False  # a 1x1 convolution (SD 1.x's transformer proj_in/proj_out)
    inert: bool = False  # its output never reaches the component's outputs (SDXL's encoders use the
    # penultimate layer): LoRA files may hold it, it changes nothing, the graph takes no input for it

    @property
    def inputs(self) -> tuple[str, str]:
        return f"lora_A.{self.module}", f"lora_B.{self.module}"


def live(layers) -> list[AdaptedLayer]:
    """The layers the graph takes inputs for."""
    return [layer for layer in layers or () if not layer.inert]


def write_layers(folder: Path, layers: list[AdaptedLayer]) -> None:
    (Path(folder) / ADAPTED_LAYERS_NAME).write_text(json.dumps([asdict(layer) for layer in layers], indent=1))


def read_layers(folder: Path) -> list[AdaptedLayer] | None:
    """The component folder's declaration, or None: it was exported without adapter inputs."""
    path = Path(folder) / ADAPTED_LAYERS_NAME
    if not path.is_file():
        return None
    return [AdaptedLayer(**entry) for entry in json.loads(path.read_text())]


def layers_digest(layers: list[AdaptedLayer]) -> str:
    """What adapters fit: two exports with the same digest take the same adapter files."""
    return hashlib.sha256(json.dumps([asdict(x) for x in layers], sort_keys=True).encode()).hexdigest()[:16]


# --- a request's choice ---------------------------------------------------------------------------

NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII only: float() also reads other scripts' digits


def parse_selection(text: str, field: str = LORA_FIELD, max_scale: float = MAX_SCALE) -> tuple[tuple[str, float], ...]:
    """'name:scale,name2:scale2' -> ((name, scale), ...) in the order given; '' -> ()."""
    text = text.strip()
    if not text:
        return ()
    chosen: dict[str, float] = {}
    for part in text.split(","):
        shown = part.strip()[:80] or text[:80]
        name, colon, scale_text = part.strip().partition(":")
        name = name.strip()
        if not NAME.fullmatch(name):
            raise RequestError(field, shown, f"{SYNTAX}; a name is 1-64 letters, digits, '.', '_' or '-'")
        if colon and not NUMBER.fullmatch(scale_text.strip()):
            raise RequestError(field, shown, f"{SYNTAX}: {scale_text.strip()[:40]!r} is not a number")
        scale = float(scale_text) if colon else 1.0
        if not math.isfinite(scale) or abs(scale) > max_scale:
            raise RequestError(field, shown, f"a finite scale in [-{max_scale:g}, {max_scale:g}] for {name}")
        if name in chosen:
            raise RequestError(field, text[:80], f"each adapter once: {name} is given twice")
        chosen[name] = scale
    if len(chosen) > MAX_ADAPTERS:
        raise RequestError(field, f"<{len(chosen)} adapters>", f"at most {MAX_ADAPTERS} adapters in one request")
    return tuple(chosen.items())


def format_selection(pairs) -> str:
    """The wire form, the same for the same choice in any order (it keys the embedding cache)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in sorted(pairs))


def parse_resolved(text: str) -> tuple[tuple[str, float], ...]:
    """What a pipeline sends its components: adapter ids (not names) and scales. Checked again here:
    the components are reachable by any client."""
    pairs = parse_selection(text, max_scale=MAX_SCALE * MAX_ADAPTERS)  # names of one file merged: scales add
    for adapter_id, _ in pairs:
        if not ADAPTER_ID.fullmatch(adapter_id):
            raise RequestError(LORA_FIELD, adapter_id, "adapter ids (16 hex digits) as the pipeline sends them")
    return pairs


# --- normalising a LoRA file ----------------------------------------------------------------------

def normalise(path: Path, layers: list[AdaptedLayer]) -> tuple[dict[str, np.ndarray], dict]:
    """A LoRA file (diffusers' or kohya's layout) as the registry stores it: for each module,
    `A.<component>.<module>` (r, in) and `B.<component>.<module>` (out, r) x alpha / r, float32.
    A ModelError names any module this export cannot adapt, or one whose shape does not fit."""
    import torch

    from kiln.models.lora_files import _DIFFUSERS_KEY, _KOHYA_KEY, _alpha, _read, scan

    summary = scan(Path(path))  # refuses LyCORIS, DoRA, damaged files, non-finite values, checkpoints
    state, metadata = _read(Path(path))
    by_diffusers = {(layer.component, layer.module): layer for layer in layers}
    by_kohya = {layer.kohya: layer for layer in layers}
    parts: dict[AdaptedLayer, dict] = {}
    outside: list[str] = []
    for key, value in state.items():
        if summary.layout == "kohya":
            prefix, module, kind = _KOHYA_KEY.match(key).groups()
            layer = by_kohya.get(f"{prefix}_{module}")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[kind]
            shown = f"{prefix}_{module}"
        else:
            component, module, kind = _DIFFUSERS_KEY.match(key).groups()
            if component.startswith("text_encoder") and not module.startswith("text_model."):
                module = "text_model." + module
            layer = by_diffusers.get((component, module))
            role = "down" if kind in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
            shown = f"{component}.{module}"
        if layer is None:
            if shown not in outside:
                outside.append(shown)
            continue
        if not layer.inert:
            parts.setdefault(layer, {})[role] = value
    if outside:
        raise ModelError(f"{path}: {len(outside)} of its modules {'is not a layer' if len(outside) == 1 else 'are not layers'} "
                         "this export takes adapters for, "
                         f"e.g. {outside[0]} (adapters apply to the linear layers of the UNet's transformer blocks and "
                         "of the text encoders; LoCon convolutions, time embeddings and other models' layers are not)",
                         hint="check that it was trained on this base; to use it anyway, merge it into a model: "
                              "kiln merge BASE OUT --lora FILE")
    tensors, ranks = {}, set()
    for layer, found in parts.items():
        where = f"{path}: module {layer.kohya if summary.layout == 'kohya' else layer.module}"
        if not (found["down"].is_floating_point() and found["up"].is_floating_point()):
            raise ModelError(f"{where} holds {found['down'].dtype} weights, not floating point",
                             hint="the file is damaged: get it again from its source")
        if found["down"].shape[0] == 0 or found["down"].numel() == 0 or found["up"].numel() == 0:
            raise ModelError(f"{where} has rank 0 (no weights)", hint="the file is damaged: get it again from its source")
        if "alpha" in found and found["alpha"].numel() != 1:
            raise ModelError(f"{where} has {found['alpha'].numel()} alpha values, not one",
                             hint="the file is damaged: get it again from its source")
        down, up = found["down"].float(), found["up"].float()
        if down.ndim == 4 and down.shape[2:] != (1, 1) or up.ndim == 4 and up.shape[2:] != (1, 1):
            raise ModelError(f"{path}: module {layer.module} has a {tuple(down.shape[2:])} convolution LoRA; the layer is "
                             "a 1x1 projection", hint="it was trained on another base model")
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        rank = down.shape[0]
        if down.shape[1] != layer.in_features or up.shape[0] != layer.out_features:
            raise ModelError(f"{path} does not fit this base: {layer.component} layer {layer.module} is "
                             f"{layer.in_features} -> {layer.out_features}, the LoRA's {down.shape[1]} -> {up.shape[0]}",
                             hint="it was trained on another base model (SD 1.x, SD 2.x and SDXL layers differ): "
                                  "add it to a model of its own family")
        if summary.layout == "kohya":
            alpha = float(found["alpha"].reshape(-1)[0]) if "alpha" in found else 0.0
            alpha = alpha or float(rank)  # kohya's loader: a missing or zero alpha means the rank
        else:
            alpha = _alpha(metadata, layer.component, layer.module, rank)
        key = f"{layer.component}.{layer.module}"
        scaled = (up * (alpha / rank)).to(torch.float32)
        if not bool(scaled.isfinite().all()):
            raise ModelError(f"{where}: alpha {alpha:g} over rank {rank} scales its weights past float32",
                             hint="the file is damaged: get it again from its source")
        tensors[f"A.{key}"] = down.contiguous().numpy()
        tensors[f"B.{key}"] = scaled.contiguous().numpy()
        ranks.add(rank)
    if not tensors:
        raise ModelError(f"{path} holds no LoRA module", hint="give a LoRA file kiln train lora or kohya's scripts wrote")
    modules: dict[str, int] = {}
    for layer in parts:
        modules[layer.component] = modules.get(layer.component, 0) + 1
    return tensors, {"layout": summary.layout, "modules": modules, "rank": max(ranks),
                     "bytes": int(sum(v.nbytes for v in tensors.values()))}


def adapter_id(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensors[key]).tobytes())
    return digest.hexdigest()[:16]


# --- the registry ---------------------------------------------------------------------------------

class Registry:
    """The adapters one served model can use: `folder/index.json` and the normalised files beside it.
    Writers (kiln lora add/remove) hold a lock and replace the index atomically; readers (the
    pipeline, at every request) re-read it only when its modification time or size changed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = self.folder / INDEX_NAME
        self._seen: tuple | None = None
        self._entries: dict = {}

    def read(self) -> dict:
        """The whole index ({"layers": digest, "adapters": {name: entry}, "removed": {id: time}});
        a ModelError naming the file when it is damaged."""
        try:
            data = json.loads(self.index.read_text())
        except FileNotFoundError:
            return {"format": 1, "layers": None, "adapters": {}, "removed": {}}
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._damaged(f"it is not JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("adapters"), dict):
            raise self._damaged("it holds no \"adapters\" object")
        for name, entry in data["adapters"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and ADAPTER_ID.fullmatch(entry["id"])):
                raise self._damaged(f"the entry {str(name)[:64]!r} is not an adapter entry")
        data.setdefault("removed", {})
        data.setdefault("layers", None)
        return data

    def _damaged(self, why: str) -> ModelError:
        return ModelError(f"the adapter index {self.index} is damaged: {why}",
                          hint="restore it, or delete it and add the adapters again with kiln lora add")

    def entries(self) -> dict[str, dict]:
        """name -> entry; cheap when nothing changed (one stat)."""
        try:
            stat = self.index.stat()
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._entries = self.read().get("adapters", {}) if seen else {}
            self._seen = seen
        return self._entries

    def resolve(self, pairs, model: str = "this model") -> str:
        """Names -> the ids their files hold now, as the components' wire string; RequestError for a
        name not registered."""
        entries = self.entries()
        resolved: dict[str, float] = {}
        for name, scale in pairs:
            if name not in entries:
                known = ", ".join(sorted(entries)[:20]) or "none"
                raise RequestError(LORA_FIELD, name, f"an adapter registered with {model} (registered: {known}); "
                                   "add one with: kiln lora add NAME FILE")
            adapter = entries[name]["id"]  # two names of one file: their scales add, as two fused copies would
            resolved[adapter] = resolved.get(adapter, 0.0) + scale
        return format_selection(resolved.items())

    def file(self, adapter: str) -> Path:
        return self.folder / f"{adapter}.safetensors"

    def _lock(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
        return held()

    def _write(self, index: dict) -> None:
        from kiln.artifacts import write_json_atomically

        write_json_atomically(self.index, index)

    def add(self, name: str, source: Path, layers: list[AdaptedLayer], replace: bool = False) -> dict:
        """Normalise `source` and register it as `name` (atomically: a request sees the old entry or
        the new one). Returns the entry."""
        from safetensors.numpy import save_file

        if not NAME.fullmatch(name):
            raise ModelError(f"adapter name {name!r} is invalid: 1-64 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        source = Path(source)
        if not source.is_file():
            raise ModelError(f"{source} does not exist", hint="give a LoRA .safetensors file")
        tensors, summary = normalise(source, layers)
        identity = adapter_id(tensors)
        digest = layers_digest(layers)
        with self._lock():
            index = self.read()
            if index["layers"] not in (None, digest):
                raise ModelError(f"the registry {self.folder} belongs to an export with other adapted layers",
                                 hint="rebuild the repository from the served export (kiln repo build)")
            index["layers"] = digest
            if name in index["adapters"] and not replace:
                raise ModelError(f"an adapter named {name} is already registered (from {index['adapters'][name]['source']})",
                                 hint="remove it first (kiln lora remove NAME), or add with --replace")
            target = self.file(identity)
            if not target.is_file():
                scratch = target.with_name(f".{identity}.{os.getpid()}.tmp")
                save_file(tensors, str(scratch), metadata={"kiln.adapter": name, "kiln.source": source.name})
                os.replace(scratch, target)
            previous = index["adapters"].get(name)
            entry = {"id": identity, "source": str(source.resolve()), "added": time.time(), **summary}
            index["adapters"][name] = entry
            index["removed"].pop(identity, None)
            if previous and previous["id"] != identity:
                self._retire(index, previous["id"])
            self._sweep(index)
            self._write(index)
        return entry

    def remove(self, name: str) -> dict:
        """Unregister `name`: requests that resolved it finish; later ones are refused. Its file is
        deleted after GRACE_S unless another name holds the same adapter."""
        with self._lock():
            index = self.read()
            if name not in index["adapters"]:
                known = ", ".join(sorted(index["adapters"])) or "none"
                raise ModelError(f"no adapter named {name} is registered (registered: {known})")
            entry = index["adapters"].pop(name)
            self._retire(index, entry["id"])
            self._sweep(index)
            self._write(index)
        return entry

    @staticmethod
    def _retire(index: dict, identity: str) -> None:
        if all(e["id"] != identity for e in index["adapters"].values()):
            index["removed"][identity] = time.time()

    def _sweep(self, index: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for identity, since in list(index["removed"].items()):
            if now - since >= GRACE_S:
                self.file(identity).unlink(missing_ok=True)
                del index["removed"][identity]


def served_registry(repo_dir: Path, model: str | None = None) -> tuple[str, Registry, list[AdaptedLayer]]:
    """A repository's registry for one served model (default: the only one that takes adapters), with
    the layers its adapters must fit: (model name, registry, layers)."""
    repo_dir = Path(repo_dir)
    manifest_path = repo_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"{repo_dir} is not a Kiln model repository (no manifest.json)",
                         hint="give the repository the server runs: --repo artifacts/repository")
    ensembles = json.loads(manifest_path.read_text())["ensembles"]
    adapted = sorted(name for name, e in ensembles.items() if e.get("adapted"))
    if model is None:
        if len(adapted) != 1:
            raise ModelError(f"{repo_dir} serves {len(adapted)} models that take LoRA adapters ({adapted})"
                             if adapted else f"no model in {repo_dir} takes LoRA adapters: it was built from exports "
                             "without LoRA inputs", hint="name one with --model" if adapted else
                             "export with kiln export onnx --lora-inputs (make deploy LORAS=1), then rebuild the repository")
        model = adapted[0]
    if model not in ensembles:
        raise ModelError(f"{repo_dir} serves no model {model!r}: it serves {sorted(ensembles)}")
    if model not in adapted:
        raise ModelError(f"{model} was exported without LoRA inputs, so it takes no adapters",
                         hint="export it with kiln export onnx --lora-inputs (make deploy LORAS=1) and rebuild")
    entry = ensembles[model]
    layers = []
    for component in entry["adapted"]:
        layers += read_layers(repo_dir / entry["components"][component] / "1") or []
    return model, Registry(repo_dir / entry["pipeline"] / REGISTRY_FOLDER), layers


# --- feeds ----------------------------------------------------------------------------------------

class AdapterStore:
    """Normalised adapters by id, read from the registry folders on first use and kept while they fit
    in `max_bytes` (least recently used dropped)."""

    def __init__(self, folders: list[Path], max_bytes: int = 4 << 30):
        self.folders = [Path(f) for f in folders]
        self.max_bytes, self.bytes = max_bytes, 0
        self.loaded: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def get(self, adapter: str) -> dict[str, np.ndarray]:
        if adapter in self.loaded:
            self.loaded.move_to_end(adapter)
            return self.loaded[adapter]
        from safetensors.numpy import load_file

        path = next((f / f"{adapter}.safetensors" for f in self.folders if (f / f"{adapter}.safetensors").is_file()), None)
        if path is None:
            raise RequestError(LORA_FIELD, adapter, "an adapter whose file is in the registry (this one was removed "
                               "longer ago than the grace period, or its file was deleted); add it again with kiln lora add")
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(f"the stored adapter {path} is damaged ({first})",
                             hint="add it again: kiln lora add NAME FILE --replace") from None
        self.loaded[adapter] = tensors
        self.bytes += sum(v.nbytes for v in tensors.values())
        while self.bytes > self.max_bytes and len(self.loaded) > 1:
            _, dropped = self.loaded.popitem(last=False)
            self.bytes -= sum(v.nbytes for v in dropped.values())
        return tensors


def adapter_feeds(layers: list[AdaptedLayer], adapters: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """The `lora_A.*` / `lora_B.*` feeds of one component for `adapters` ((normalised tensors, scale)
    pairs): concatenated along the rank, each B times its scale; rank-1 zeros where none applies."""
    feeds = {}
    for layer in live(layers):
        key = f"{layer.component}.{layer.module}"
        a_parts = [t[f"A.{key}"] for t, _ in adapters if f"A.{key}" in t]
        b_parts = [t[f"B.{key}"] * np.float32(s) for t, s in adapters if f"A.{key}" in t]
        for a, b in zip(a_parts, b_parts):
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
                    or a.shape[0] != b.shape[1] or a.dtype != np.float32:
                raise ModelError(f"a stored adapter does not fit {key}: A {list(a.shape)}, B {list(b.shape)} for a "
                                 f"{layer.in_features} -> {layer.out_features} layer",
                                 hint="the registry's file is damaged: add the adapter again with kiln lora add --replace")
        a_name, b_name = layer.inputs
        if a_parts:
            feeds[a_name] = np.concatenate(a_parts, axis=0) if len(a_parts) > 1 else a_parts[0]
            feeds[b_name] = np.concatenate(b_parts, axis=1) if len(b_parts) > 1 else b_parts[0]
        else:
            feeds[a_name] = np.zeros((1, layer.in_features), np.float32)
            feeds[b_name] = np.zeros((layer.out_features, 1), np.float32)
    return feeds


def zero_feeds(layers: list[AdaptedLayer]) -> dict[str, np.ndarray]:
    return adapter_feeds(layers, [])
