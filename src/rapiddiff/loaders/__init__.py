"""Loading user weights into pipelines: LoRA adapters and textual-inversion embeddings (Diffusers' loader API)."""
