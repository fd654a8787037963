"""rapiddiff models: one module tree per architecture, Diffusers' state-dict keys."""
