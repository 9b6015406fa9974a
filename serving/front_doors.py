"""The gateway's doors: A1111's and OpenAI's image APIs as typed requests, each mapped to one Kiln
generation (the fields `KilnClient.generate` takes), and their answers built from its images.

Pure: no server and no network here; serving/gateway.py puts these behind HTTP. Fields a door
leaves out take the served model's own defaults (its repository's), not A1111's or OpenAI's, so a
door draws what Triton draws for the same request. What a door cannot honour (hires fix, face
restoration, masks, URLs) is refused by name, never ignored."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import RequestError
from kiln.pipeline.request import MAX_SEED, RANDOM_SEED
from kiln.pipeline.schedulers import A1111_SAMPLERS, COMFYUI_SAMPLERS, canonical_name, with_schedule

INT32 = 2**31 - 1  # the wire type of steps, sizes and counts: larger numbers cannot reach Triton
MAX_TEXT = 100_000  # characters: a bound on what a door holds; the served model's own limit is Triton's to name
MAX_IMAGE_TEXT = 12 << 20  # base64 characters: an 8 MiB image (Triton's bound) is 11.2 M
MAX_COUNT = 100  # batch_size, n_iter, n: the served model's own limit (max_images) is Triton's to name
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_KILN_ERROR = re.compile(r"(\w+)=(.*?) is invalid: expected (.*)$", re.DOTALL)

Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Positive = Annotated[int, Field(ge=1, le=INT32)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
ImageText = Annotated[str, Field(max_length=MAX_IMAGE_TEXT)]
Seed = Annotated[int, Field(ge=RANDOM_SEED, le=MAX_SEED)]


class DoorError(Exception):
    """A request a door refuses: `field` as that door's API names it, a message naming the value and
    the fix, and the HTTP status (422: the request is invalid; 404: no such model)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status
        self.retry_after_s = 0  # a 503's Retry-After


@dataclass(frozen=True)
class Served:
    """One served txt2img endpoint as the gateway knows it: its name, family, defaults and limits
    (from its Triton configs; empty where the server does not say)."""

    name: str
    family: str = ""
    defaults: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    controlnets: tuple[str, ...] = ()  # the ControlNets its export holds, by name


@dataclass(frozen=True)
class Call:
    """One Kiln generation: the endpoint and `KilnClient.generate`'s keyword arguments."""

    model: str
    kwargs: dict

    def effective(self, served: Served, name: str):
        """The value the server draws with: the request's, else the served model's default."""
        value = self.kwargs.get(name)
        return value if value is not None else served.defaults.get(name)


# --- shared --------------------------------------------------------------------------------------

def decode_image(text: str, field: str) -> bytes:
    """A base64 image (optionally a data: URL) -> its bytes, checked to be a PNG, JPEG or WebP file."""
    if not isinstance(text, str) or not text:
        raise DoorError(field, f"{field} is empty: expected a base64-encoded PNG or JPEG")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", _DATA_URL.sub("", text.strip())), validate=True)  # line-wrapped too
    except (binascii.Error, ValueError):
        raise DoorError(field, f"{field} is not valid base64: expected a base64-encoded PNG or JPEG "
                        "(optionally a data:image/png;base64, URL)") from None
    return check_image(data, field)


def check_image(data: bytes, field: str) -> bytes:
    from PIL import Image

    try:
        kind = Image.open(io.BytesIO(data)).format  # the header only
    except Exception:
        kind = None
    if kind not in IMAGE_FORMATS:
        raise DoorError(field, f"{field} ({len(data)} bytes) is not an image: expected a PNG, JPEG or WebP file")
    return data


def encode_png(image: np.ndarray, parameters: str | None = None) -> str:
    """(H, W, 3) uint8 -> base64 PNG; `parameters`: A1111's infotext in a tEXt chunk, as A1111 saves it."""
    from PIL import Image, PngImagePlugin

    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def choose_model(name: str | None, served: dict[str, Served], default: str, field: str) -> Served:
    """The served model a request names (A1111 titles may end with " [hash]"), else `default`."""
    if not served:
        raise DoorError("", "the Triton server serves no txt2img model right now", status=503)
    if name is None or name == "":
        return served.get(default) or served[sorted(served)[0]]
    chosen = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())  # A1111's titles end with " [hash]"
    if chosen not in served:
        raise DoorError(field, f"{field}={name!r} is not served here: expected one of {sorted(served)}", status=404)
    return served[chosen]


def from_kiln(exc: RequestError | str, names: dict[str, str]) -> DoorError:
    """A Kiln request error (raised here, or Triton's answer text) as the door names its fields:
    `names` maps Kiln's field to the door's, optionally with how the door's value is written
    ("batch_size:batch_size x n_iter")."""
    text = str(exc)
    match = _KILN_ERROR.search(text)
    if match is None:
        return DoorError("", text)
    kiln_field, value, allowed = match.groups()
    door_field, _, label = names.get(kiln_field, kiln_field).partition(":")
    return DoorError(door_field, f"{label or door_field}={value} is invalid: expected {allowed}")


# --- A1111 ----------------------------------------------------------------------------------------

A1111_FIELDS = {"guidance_scale": "cfg_scale", "num_images": "batch_size:batch_size x n_iter", "scheduler": "sampler_name",
                "init_image": "init_images", "strength": "denoising_strength", "loras": "prompt:<lora:...>",
                "controlnet": "alwayson_scripts.controlnet.args:model", "control_image": "alwayson_scripts.controlnet.args:image",
                "control_scale": "alwayson_scripts.controlnet.args:weight",
                "control_start": "alwayson_scripts.controlnet.args:guidance_start",
                "control_end": "alwayson_scripts.controlnet.args:guidance_end"}
_EXTRA_NETWORK = re.compile(r"<(\w+):([^<>]*)>")
A1111_SETTINGS = {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"}


class A1111Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img. A1111's other fields are accepted at their defaults (hires fix, face
    restoration, tiling, scripts and variation seeds change the image in ways this server does not
    draw, so a value that asks for them is refused); fields A1111 does not know are ignored, as A1111
    ignores them."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = ""
    negative_prompt: Text = ""
    styles: list[str] = []
    seed: Seed = RANDOM_SEED
    subseed: int = -1
    subseed_strength: Finite = 0.0
    sampler_name: Text | None = None
    sampler_index: Text | None = None  # older clients name the sampler here
    scheduler: Text | None = Field(None, description="A1111 >= 1.9's sigma schedule: Automatic or Karras")
    batch_size: Count = 1
    n_iter: Count = 1
    steps: Positive | None = None
    cfg_scale: Finite | None = None
    width: Positive | None = None
    height: Positive | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    override_settings: dict[str, Any] = {}
    alwayson_scripts: dict[str, Any] = {}
    script_name: str | None = None
    send_images: bool = True
    save_images: bool = False


class A1111Img2Img(A1111Txt2Img):
    """POST /sdapi/v1/img2img: the first of `init_images` (base64) redrawn from `denoising_strength`."""

    init_images: list[ImageText] = Field(..., min_length=1, max_length=1)
    denoising_strength: Finite = 0.75
    mask: str | None = None
    resize_mode: int = 0
    image_cfg_scale: Finite | None = None
    include_init_images: bool = False


def _refuse_unsupported(req: A1111Txt2Img) -> None:
    asked = {
        "enable_hr": (req.enable_hr, "hires fix (a second, upscaled pass)"),
        "restore_faces": (req.restore_faces, "face restoration"),
        "tiling": (req.tiling, "tiling"),
        "subseed_strength": (req.subseed_strength, "variation seeds"),
        "script_name": (req.script_name, "scripts"),
        "alwayson_scripts": ({k: v for k, v in req.alwayson_scripts.items() if k.lower() != "controlnet"},
                             "always-on scripts other than ControlNet (ADetailer, ...)"),
        "styles": (req.styles, "saved styles"),
        "save_images": (req.save_images, "saving images on the server"),
    }
    if isinstance(req, A1111Img2Img):
        asked["mask"] = (req.mask, "inpainting masks")
        asked["resize_mode"] = (req.resize_mode, "resize modes other than 0 (just resize)")
        asked["include_init_images"] = (req.include_init_images, "returning the init images")
    for name, (value, what) in asked.items():
        if value:
            raise DoorError(name, f"{name}={value!r}: this server does not draw {what}; leave it out")
    if not req.send_images:
        raise DoorError("send_images", "send_images=false: the images are the answer; leave it out")
    unknown = sorted(set(req.override_settings) - A1111_SETTINGS)
    if unknown:
        raise DoorError(f"override_settings.{unknown[0]}", f"override_settings {unknown} cannot be honoured here: "
                        f"expected only {sorted(A1111_SETTINGS)}")
    vae = req.override_settings.get("sd_vae", "Automatic")
    if vae not in ("Automatic", "None", None):
        raise DoorError("override_settings.sd_vae", f"sd_vae={vae!r}: each served model draws with its own VAE; "
                        "expected Automatic")
    clip_skip = req.override_settings.get("CLIP_stop_at_last_layers", 1)
    if clip_skip != 1 or isinstance(clip_skip, bool):
        raise DoorError("override_settings.CLIP_stop_at_last_layers", f"CLIP_stop_at_last_layers={clip_skip!r}: "
                        "each served model's text encoder layer is fixed by its family; expected 1")


class ControlNetUnit(BaseModel):
    """One unit of the sd-webui-controlnet extension's API (alwayson_scripts.controlnet.args[i]). The
    control image is sent ready-made (module "none"); settings that change how the extension would
    preprocess or weigh it are refused rather than ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    image: ImageText | dict | None = None
    input_image: ImageText | None = None  # older clients' name for image
    module: str = "none"
    model: str = ""
    weight: Finite = 1.0
    guidance_start: Finite = 0.0
    guidance_end: Finite = 1.0
    resize_mode: int | str = "Crop and Resize"
    control_mode: int | str = "Balanced"
    guess_mode: bool = False
    mask: ImageText | None = None  # newer clients' inpainting mask for the unit: refused
    mask_image: ImageText | None = None


CONTROLNET_RESIZE = {"just resize": "just", "0": "just", "crop and resize": "crop", "1": "crop",
                     "inner fit (scale to fit)": "crop"}  # the extension's names and numbers for its modes


def controlnet_units(scripts: dict[str, Any], served: Served, height: int | None, width: int | None,
                     init_image: bytes | None = None) -> dict:
    """alwayson_scripts.controlnet's enabled units -> Kiln's control fields (controlnet, control_image,
    control_scale, control_start, control_end). "Crop and Resize" (the extension's default) crops each
    control image to the generated aspect ratio here; the server then resizes it, as "Just Resize" does.
    A unit without an image takes `init_image` (img2img), as the extension does."""
    from pydantic import ValidationError

    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return {}
    where = "alwayson_scripts.controlnet.args"
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise DoorError(where, f"{where}: expected a list of ControlNet units ({{\"args\": [{{\"image\": ..., \"model\": ...}}]}})")
    units = []
    for i, raw in enumerate(args):
        try:
            unit = ControlNetUnit.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = ".".join(str(p) for p in error["loc"])
            raise DoorError(f"{where}.{i}.{name}", f"{where}.{i}.{name}: {error['msg']}") from None
        if unit.enabled:
            units.append((i, unit))
    if len(units) > max(len(served.controlnets), 1):
        raise DoorError(where, f"{where}: {len(units)} enabled units, but {served.name} serves "
                        f"{len(served.controlnets)} ControlNet(s) ({', '.join(served.controlnets) or 'none'}): one unit each")
    names, images, scales, starts, ends = [], [], [], [], []
    for i, unit in units:
        field = f"{where}.{i}"
        if unit.module.strip().lower() not in ("none", ""):
            raise DoorError(f"{field}.module", f"{field}.module={unit.module!r}: this server does not run preprocessors; "
                            "send the ready control image with module \"none\" (kiln data prepare --control canny|mask "
                            "makes edge maps and masks)")
        if str(unit.control_mode).strip().lower() not in ("balanced", "0") or unit.guess_mode:
            raise DoorError(f"{field}.control_mode", f"{field}.control_mode={unit.control_mode!r}: only Balanced "
                            "(diffusers' ControlNet pipelines) is drawn here; leave it out")
        resize = CONTROLNET_RESIZE.get(str(unit.resize_mode).strip().lower())
        if resize is None:
            raise DoorError(f"{field}.resize_mode", f"{field}.resize_mode={unit.resize_mode!r}: expected Just Resize or "
                            "Crop and Resize (Resize and Fill is not drawn here)")
        if unit.mask or unit.mask_image:
            raise DoorError(f"{field}.mask", f"{field}.mask: this server does not take ControlNet masks; leave it out")
        model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", unit.model.strip())
        if model not in served.controlnets:
            have = list(served.controlnets) or "none: export the model with kiln export onnx ... --controlnet NAME=DIR"
            raise DoorError(f"{field}.model", f"{field}.model={unit.model[:100]!r} is not served with {served.name}: "
                            f"expected one of {have} (GET /controlnet/model_list)", status=404 if served.controlnets else 422)
        if model in names:
            raise DoorError(f"{field}.model", f"{field}.model={model!r} is in an earlier unit too: each ControlNet "
                            "once per request")
        image = unit.image if unit.image is not None else unit.input_image
        if isinstance(image, dict):  # the extension's older {"image": ..., "mask": ...} form
            if image.get("mask"):
                raise DoorError(f"{field}.image.mask", f"{field}.image.mask: this server does not take ControlNet masks")
            image = image.get("image")
        if image is None and init_image is not None:
            data = init_image  # img2img: the init image is the control image
        elif not isinstance(image, str):
            raise DoorError(f"{field}.image", f"{field}.image is missing: expected the control image, base64")
        else:
            data = decode_image(image, f"{field}.image")
        if resize == "crop":
            data = _crop_to_aspect(data, height or served.defaults.get("height"), width or served.defaults.get("width"))
        names.append(model)
        images.append(data)
        scales.append(unit.weight)
        starts.append(unit.guidance_start)
        ends.append(unit.guidance_end)
    if not names:
        return {}
    return {"controlnet": ",".join(names), "control_image": images, "control_scale": scales, "control_start": starts,
            "control_end": ends}


def _crop_to_aspect(data: bytes, height: int | None, width: int | None) -> bytes:
    """The centre of an image cut to height:width (the extension's Crop and Resize, before the resize)."""
    from PIL import Image

    if not height or not width:
        return data
    image = Image.open(io.BytesIO(data))
    target = width / height
    if abs(image.width / image.height - target) < 1e-3:
        return data
    if image.width / image.height > target:
        keep = round(image.height * target)
        box = ((image.width - keep) // 2, 0, (image.width - keep) // 2 + keep, image.height)
    else:
        keep = round(image.width / target)
        box = (0, (image.height - keep) // 2, image.width, (image.height - keep) // 2 + keep)
    buffer = io.BytesIO()
    image.convert("RGB").crop(box).save(buffer, format="PNG")
    return buffer.getvalue()


def lora_tags(*texts: str) -> tuple[list[str], str]:
    """A1111's extra-network tags: `<lora:NAME>` or `<lora:NAME:SCALE>` taken out of each text, as
    Kiln's `loras` ("NAME:SCALE,..."). Other networks (hypernetworks, LyCORIS tags) are refused."""
    pairs, cleaned = [], []
    for text in texts:
        for kind, body in _EXTRA_NETWORK.findall(text):
            if kind.lower() != "lora":
                raise DoorError("prompt", f"<{kind}:{body}>: this server applies LoRA adapters only (<lora:NAME:SCALE>), "
                                f"not {kind} networks; leave the tag out")
            if "," in body:
                raise DoorError("prompt", f"<{kind}:{body}>: one adapter per tag, <lora:NAME:SCALE> (no commas); "
                                "write a tag for each")
            name, _, rest = body.partition(":")
            scale = rest.split(":")[0] if rest else "1"  # A1111's <lora:NAME:TE:UNET>: one scale for both here
            pairs.append(f"{name.strip()}:{scale.strip()}")
        cleaned.append(re.sub(r"\s{2,}", " ", _EXTRA_NETWORK.sub("", text)).strip(" ,"))
    return cleaned, ",".join(pairs)


def a1111_call(req: A1111Txt2Img, served: dict[str, Served], default: str) -> Call:
    """An A1111 request -> one Kiln generation. Image i is drawn with seed + i, as A1111 numbers them
    across batch_size x n_iter, so one request for all of them draws the same images."""
    _refuse_unsupported(req)
    checkpoint = req.override_settings.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise DoorError("override_settings.sd_model_checkpoint", f"{checkpoint!r}: expected a model title from "
                        "GET /sdapi/v1/sd-models")
    model = choose_model(checkpoint, served, default, "override_settings.sd_model_checkpoint")
    sampler = req.sampler_name or req.sampler_index
    try:
        canonical_name(sampler) if sampler else None
    except RequestError as exc:  # Kiln's field is `scheduler`; A1111 names the sampler apart from its schedule
        raise from_kiln(exc, {"scheduler": "sampler_name" if req.sampler_name else "sampler_index"}) from None
    try:
        scheduler = with_schedule(sampler, req.scheduler) if sampler else None
    except RequestError as exc:
        raise from_kiln(exc, {}) from None
    if req.scheduler and not sampler and req.scheduler.strip().lower() != "automatic":
        raise DoorError("scheduler", f"scheduler={req.scheduler!r} needs a sampler_name to apply to "
                        f"(the Karras samplers: {', '.join(a for a in A1111_SAMPLERS if 'Karras' in a)})")
    (prompt, negative), loras = lora_tags(req.prompt, req.negative_prompt)
    kwargs = {"prompt": prompt, "negative_prompt": negative or None, "seed": req.seed,
              "steps": req.steps, "guidance_scale": req.cfg_scale, "height": req.height, "width": req.width,
              "scheduler": scheduler, "num_images": req.batch_size * req.n_iter, "loras": loras or None}
    if isinstance(req, A1111Img2Img):
        kwargs["image"] = decode_image(req.init_images[0], "init_images.0")
        kwargs["strength"] = req.denoising_strength
    kwargs.update(controlnet_units(req.alwayson_scripts, model, req.height, req.width, kwargs.get("image")))
    return Call(model.name, kwargs)


def sampler_label(name: str | None) -> str:
    """A canonical scheduler name as A1111 shows it (its menu name where it has one)."""
    if not name or name == "default":
        return "Default"
    for label, short in A1111_SAMPLERS.items():
        if short == name:
            return label
    return name


def infotext(call: Call, served: Served, seed: int, height: int, width: int) -> str:
    """A1111's generation parameters text (its PNG 'parameters' chunk and infotexts)."""
    kw = call.kwargs
    tags = "".join(f" <lora:{pair.partition(':')[0]}:{pair.partition(':')[2]}>" for pair in (kw.get("loras") or "").split(",")
                   if pair)  # as A1111 writes them: pasted back into A1111, the image comes back with its LoRAs
    lines = [kw["prompt"] + tags]
    if kw.get("negative_prompt"):
        lines.append(f"Negative prompt: {kw['negative_prompt']}")
    settings = [f"Steps: {call.effective(served, 'steps')}",
                f"Sampler: {sampler_label(call.effective(served, 'scheduler'))}",
                f"CFG scale: {call.effective(served, 'guidance_scale')}", f"Seed: {seed}", f"Size: {width}x{height}",
                f"Model: {call.model}"]
    if kw.get("image") is not None:
        settings.append(f"Denoising strength: {kw['strength']}")
    for i, name in enumerate((kw.get("controlnet") or "").split(",") if kw.get("controlnet") else []):
        settings.append(f'ControlNet {i}: "Module: none, Model: {name}, Weight: {kw["control_scale"][i]:g}, '
                        f'Guidance Start: {kw["control_start"][i]:g}, Guidance End: {kw["control_end"][i]:g}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def a1111_answer(req: A1111Txt2Img, call: Call, served: Served, images: np.ndarray, seeds: list[int]) -> dict:
    """A1111's answer: base64 PNGs (each with its parameters chunk), the request echoed, and `info`
    (a JSON string, as A1111 sends it) with every image's seed."""
    height, width = images.shape[1:3]
    texts = [infotext(call, served, s, height, width) for s in seeds]
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": int(width), "height": int(height), "sampler_name": sampler_label(call.effective(served, "scheduler")),
        "cfg_scale": call.effective(served, "guidance_scale"), "steps": call.effective(served, "steps"),
        "batch_size": req.batch_size, "n_iter": req.n_iter, "sd_model_name": call.model, "infotexts": texts,
        "denoising_strength": call.kwargs.get("strength"), "index_of_first_image": 0,
    }
    return {"images": [encode_png(image, text) for image, text in zip(images, texts)],
            "parameters": req.model_dump(exclude={"init_images"}), "info": json.dumps(info)}


def a1111_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's menu names this server draws, with Kiln's and ComfyUI's names as aliases."""
    comfy = {}
    for name, short in COMFYUI_SAMPLERS.items():
        comfy.setdefault(short, []).append(name)
    return [{"name": label, "aliases": sorted({short, *comfy.get(short, [])}), "options": {}}
            for label, short in A1111_SAMPLERS.items()]


def a1111_models(served: dict[str, Served]) -> list[dict]:
    return [{"title": s.name, "model_name": s.name, "hash": None, "sha256": None, "filename": s.name,
             "config": None, "family": s.family} for s in served.values()]


# --- OpenAI ---------------------------------------------------------------------------------------

OPENAI_FIELDS = {"num_images": "n", "height": "size", "width": "size", "init_image": "image", "strength": "strength",
                 "guidance_scale": "guidance_scale", "loras": "loras"}


class OpenAIGeneration(BaseModel):
    """POST /v1/images/generations. `negative_prompt`, `seed`, `steps`, `guidance_scale`, `scheduler`
    and `loras` are Kiln's own additions; any other field OpenAI does not define is refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(..., min_length=1)
    model: Text | None = None
    n: Count = 1
    size: Text | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512, or auto (the model's default)")
    response_format: Literal["b64_json", "url"] | None = None
    quality: Literal["auto", "standard"] | None = None
    user: Text | None = None
    negative_prompt: Text | None = None
    seed: Seed | None = None
    steps: Positive | None = None
    guidance_scale: Finite | None = None
    scheduler: Text | None = None
    loras: Text | None = Field(None, description="LoRA adapters registered with the server: NAME:SCALE,NAME2:SCALE2")


class OpenAIEdit(OpenAIGeneration):
    """POST /v1/images/edits (multipart form): `image` redrawn from `strength` (Kiln's addition); a
    `mask` (inpainting) is refused."""

    strength: Finite | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" -> (height, width); None or "auto": the model's default (or the image's size)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    match = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", size)
    if match is None:
        raise DoorError("size", f"size={size!r} is invalid: expected WIDTHxHEIGHT, e.g. 512x512, or auto")
    return int(match.group(2)), int(match.group(1))


def openai_call(req: OpenAIGeneration, served: dict[str, Served], default: str, image: bytes | None = None) -> Call:
    if req.response_format == "url":
        raise DoorError("response_format", "response_format='url' is not served: this gateway keeps no image files; "
                        "ask for b64_json")
    model = choose_model(req.model, served, default, "model")
    height, width = parse_size(req.size)
    try:
        scheduler = canonical_name(req.scheduler) if req.scheduler else None
    except RequestError as exc:
        raise from_kiln(exc, {}) from None
    kwargs = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed, "steps": req.steps,
              "guidance_scale": req.guidance_scale, "height": height, "width": width, "scheduler": scheduler,
              "num_images": req.n, "loras": req.loras}
    if image is not None:
        kwargs["image"] = check_image(image, "image")
        kwargs["strength"] = getattr(req, "strength", None)
    return Call(model.name, kwargs)


def openai_answer(images: np.ndarray, seeds: list[int], created: int) -> dict:
    """OpenAI's images answer; each item also names the seed it was drawn with (Kiln's addition)."""
    return {"created": created, "data": [{"b64_json": encode_png(image), "seed": seed} for image, seed in zip(images, seeds)]}


def openai_error(message: str, param: str | None, code: str | None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param or None, "code": code}}
