"""rapiddiff schedulers: Diffusers' config keys and methods on one shared base."""
