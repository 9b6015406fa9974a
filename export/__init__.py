"""Export: each Stable Diffusion component to ONNX, checked against PyTorch, from one declared spec."""
