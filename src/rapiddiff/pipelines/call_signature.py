"""Diffusers' `__call__` and `__init__` signatures, each argument declared once.

A pipeline names its parameters in Diffusers' order (positional calls such as `pipe(prompt, image)` bind as they do
there). Their types are the fields of the pipeline's `CallArgs` class, their defaults `DEFAULTS`, or the pipeline's
own where Diffusers' value differs between pipelines (steps, guidance, strength...). `inspect.signature(pipe.__call__)`
is Diffusers' signature; the call binds its arguments to it and hands them to `generate` as that `CallArgs`.
`pipeline_init` does the same for `__init__`: the components and config values, handed to the model family's
`register_components`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

# Diffusers' defaults where every pipeline that has the argument agrees; an argument not here defaults to None.
DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 50, "guidance_scale": 7.5, "num_images_per_prompt": 1, "eta": 0.0, "output_type": "pil",
    "return_dict": True, "guidance_rescale": 0.0, "callback_steps": 1, "clean_caption": True,
    "callback_on_step_end_tensor_inputs": ["latents"],
    "controlnet_conditioning_scale": 1.0, "guess_mode": False, "control_guidance_start": 0.0, "control_guidance_end": 1.0,
    "crops_coords_top_left": (0, 0), "negative_crops_coords_top_left": (0, 0),
    "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5,
}  # fmt: skip

_ARG = inspect.Parameter.POSITIONAL_OR_KEYWORD


def pipeline_call(
    args: type,
    doc: str,
    names: str,
    *,
    returns: str,
    var_kwargs: bool = False,
    **defaults: Any,
) -> Callable[..., Any]:
    """A pipeline's `__call__` taking `names` (space-separated, Diffusers' order), then `**kwargs` where Diffusers'
    signature ends with it (its deprecated `callback`/`callback_steps`), and running `self.generate(args(...))`.
    `defaults`: this pipeline's own defaults, for arguments whose default differs between Diffusers' pipelines."""
    fields = {f.name: f.type for f in dataclasses.fields(args) if f.init}
    order = names.split()
    unknown = sorted({*order, *defaults} - set(fields))
    if unknown:
        raise TypeError(f"{args.__name__} has no field(s) {unknown} to carry these call arguments")
    stray = sorted(set(defaults) - set(order))
    if stray:
        raise TypeError(f"defaults given for {stray}, which are not among the call's parameters")
    params = [inspect.Parameter("self", _ARG)]
    params += [
        inspect.Parameter(n, _ARG, default=defaults.get(n, DEFAULTS.get(n)), annotation=fields[n]) for n in order
    ]
    if var_kwargs:
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any"))
    signature = inspect.Signature(params, return_annotation=returns)

    @torch.no_grad()
    def __call__(self: Any, *positional: Any, **keywords: Any) -> Any:
        bound = signature.bind(self, *positional, **keywords)  # Python's TypeError for a wrong argument
        bound.apply_defaults()
        return self.generate(args.from_locals(bound.arguments))

    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = doc
    return __call__


def pipeline_init(spec: str) -> Callable[..., None]:
    """A pipeline's `__init__` with Diffusers' signature. `spec`: its parameters in Diffusers' order, space-separated,
    `name=default` (a Python literal) for those with a default. The bound arguments go to
    `self.register_components(components, config)`: the components are the class's `component_names()` (parameters
    without a default, and `_optional_components`), the rest are config values."""
    params = [inspect.Parameter("self", _ARG)]
    for item in spec.split():
        name, given, default = item.partition("=")
        default = ast.literal_eval(default) if given else inspect.Parameter.empty
        params.append(inspect.Parameter(name, _ARG, default=default, annotation="Any"))
    signature = inspect.Signature(params, return_annotation="None")

    def __init__(self: Any, *positional: Any, **keywords: Any) -> None:
        bound = signature.bind(self, *positional, **keywords)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        names = set(type(self).component_names())
        components = {k: v for k, v in values.items() if k in names}
        self.register_components(components, {k: v for k, v in values.items() if k not in names})

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    return __init__
