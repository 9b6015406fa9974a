"""Fine-tuning: LoRA, DreamBooth, Textual Inversion and full fine-tuning on diffusers, peft and accelerate."""
