"""Loading user weights into pipelines: LoRA adapters, textual-inversion embeddings (Diffusers' loader API) and
single-file checkpoints in the original Stable Diffusion layout."""
