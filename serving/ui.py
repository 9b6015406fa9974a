"""`kiln ui`: a Gradio page in front of a running Kiln Triton server, for looking at what it draws
(the `ui` extra). Each click is one Triton request through Kiln's client; the gallery shows the
images Triton returned, losslessly (PNG), each captioned with its seed. The server's refusals are
shown in the page as they are worded."""

from __future__ import annotations

from kiln.clients.client import KilnClient
from kiln.errors import ClientError, KilnError
from kiln.pipeline.schedulers import A1111_SAMPLERS, DEFAULT

SCHEDULER_CHOICES = (DEFAULT, *A1111_SAMPLERS)


class UiError(KilnError):
    """The page cannot start (Gradio is not installed)."""


def generate_images(url: str, model: str, prompt: str, negative: str, seed: float | None, steps: float | None,
                    guidance: float | None, scheduler: str, width: float | None, height: float | None,
                    count: float | None, init_image: str | None, strength: float | None, loras: str = "",
                    control_image: str | None = None, controlnet: str | None = None, control_scale: float | None = None):
    """One Triton request; returns [(image, caption)] for the gallery. Raises ClientError as worded by the server.
    `control_image` (a file path) goes to `controlnet` (a name; None: every ControlNet the model holds)."""
    def whole(value):
        return None if value is None or value == "" else int(value)

    seed = whole(seed)
    with KilnClient(url, "http", model=model, timeout_s=600) as client:
        result = client.generate(
            prompt, negative_prompt=negative or None, seed=seed if seed is not None and seed >= 0 else -1,
            steps=whole(steps), guidance_scale=guidance, scheduler=None if scheduler == DEFAULT else scheduler,
            width=whole(width), height=whole(height), num_images=whole(count),
            image=init_image or None, strength=strength if init_image else None, loras=(loras or "").strip() or None,
            control_image=control_image or None, controlnet=(controlnet or None) if control_image else None,
            control_scale=control_scale if control_image else None)
    return [(image, f"seed {seed}") for image, seed in zip(result.images, result.seeds)]


def create_page(url: str, admin_key: str | None = None):
    """The Gradio Blocks page for the Triton server at `url` (host:port, HTTP); with the server's
    `admin_key` its model menu lists every served model, else txt2img."""
    try:
        import gradio as gr
    except ImportError:
        raise UiError("kiln ui needs Gradio", hint="pip install 'kiln[ui]'") from None
    from kiln.serving.gateway import Catalog

    served = Catalog(url, admin_key).served()
    names = sorted(served) or ["txt2img"]
    first = served.get(names[0])
    defaults = first.defaults if first else {}

    def run(model, prompt, negative, seed, steps, guidance, scheduler, width, height, count, init_image, strength, loras,
            control_image, controlnet, control_scale):
        try:
            return generate_images(url, model, prompt, negative, seed, steps, guidance, scheduler, width, height,
                                   count, init_image, strength, loras, control_image, controlnet, control_scale)
        except ClientError as exc:
            raise gr.Error(exc.detail, title="The server refused this" if exc.rejected else "The server failed") from None

    with gr.Blocks(title="Kiln") as page:
        gr.Markdown(f"### Kiln: the models served by Triton at `{url}`")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                loras = gr.Textbox(label="LoRA adapters (name:scale, ...; kiln lora list)", lines=1, elem_id="loras")
                with gr.Row():
                    model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                    scheduler = gr.Dropdown(list(SCHEDULER_CHOICES), value=DEFAULT, label="Sampler", elem_id="sampler")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    steps = gr.Number(value=defaults.get("steps", 20), precision=0, label="Steps", elem_id="steps")
                    guidance = gr.Number(value=defaults.get("guidance_scale", 7.5), label="Guidance", elem_id="guidance")
                with gr.Row():
                    width = gr.Number(value=defaults.get("width", 512), precision=0, label="Width", elem_id="width")
                    height = gr.Number(value=defaults.get("height", 512), precision=0, label="Height", elem_id="height")
                    count = gr.Number(value=1, precision=0, label="Images", elem_id="count")
                with gr.Accordion("img2img", open=False):
                    init_image = gr.Image(type="filepath", label="Init image", elem_id="init-image")
                    strength = gr.Slider(0.01, 1.0, value=defaults.get("strength", 0.8), label="Strength")
                controlnets = sorted({n for s in served.values() for n in s.controlnets})
                with gr.Accordion("ControlNet", open=False, visible=bool(controlnets)):
                    control_image = gr.Image(type="filepath", label="Control image (edges, mask, pose: ready-made)",
                                             elem_id="control-image")
                    with gr.Row():
                        controlnet = gr.Dropdown(controlnets, value=controlnets[0] if controlnets else None,
                                                 label="ControlNet", elem_id="controlnet")
                        control_scale = gr.Slider(0.0, 2.0, value=1.0, label="Control scale", elem_id="control-scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", format="png", columns=2, height="auto", elem_id="gallery", show_label=True)
        inputs = [model, prompt, negative, seed, steps, guidance, scheduler, width, height, count, init_image, strength, loras,
                  control_image, controlnet, control_scale]
        button.click(run, inputs, gallery)
        prompt.submit(run, inputs, gallery)
    return page

