"""rapiddiff pipelines: Diffusers' call signatures over one shared denoising loop."""
