"""`rapiddiff bench`: the reference page's benchmark (iterations/s of the denoising loop), rapiddiff and diffusers side by side.

Modules: presets (sizes, steps, configs), settings (one run's matrix), backends (rapiddiff or diffusers by Diffusers
names), components and workloads (the pipelines and their inputs), modes (eager, vanilla attention, compiled),
measure (timing one cell), sweep (the matrix), env and report (JSON, CSV, Markdown, charts, merging), cli.
"""
