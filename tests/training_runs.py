"""Settings for the short training runs the tests share."""

METHOD_SETTINGS = {
    "lora": ["optim.learning_rate=3e-2", "lora.rank=4", "lora.alpha=8", "lora.format=kohya"],
    # Only two embedding rows train and the random tiny model listens little to text: a gentle rate.
    "textual-inversion": ["optim.learning_rate=1e-2", "optim.adam_weight_decay=0", "train_batch_size=4",
                          "textual_inversion.placeholder_token=<shape-style>",
                          "textual_inversion.initializer_token=style", "textual_inversion.num_vectors=2"],
    "dreambooth": ["optim.learning_rate=3e-2", "dreambooth.instance_prompt=a photo of sks shape",
                   "dreambooth.class_prompt=a photo of a shape", "dreambooth.num_class_images=2",
                   "dreambooth.class_generation_steps=2"],
    "full": ["optim.learning_rate=1e-3", "full.ema_decay=0.5"],
}


def train_settings(model, data, out, *extra):
    return [f"model={model}", f"data.path={data}", f"output_dir={out}", "data.resolution=64", "train_batch_size=2",
            "tensorboard=false", *extra]
