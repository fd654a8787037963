"""IP-Adapter with Diffusers' API: `pipe.load_ip_adapter`, `set_ip_adapter_scale`, `unload_ip_adapter`, the call
arguments `ip_adapter_image` / `ip_adapter_image_embeds`, and the UNet's `_load_ip_adapter_weights`.

Weight files are Diffusers' (the original IP-Adapter release's) format: `image_proj.*` (the image projection) and
`ip_adapter.<n>.to_k_ip.weight` / `.to_v_ip.weight` (n = 1, 3, 5, ...: the UNet's cross-attention layers in
`attn_processors` order), as `.safetensors` with those prefixes or as a `.bin` holding {"image_proj": ...,
"ip_adapter": ...}. The projection kind is read from its keys (IP-Adapter, Plus, Full Face, FaceID) and its keys are
renamed to Diffusers' module names; the layers themselves are `rapiddiff.models.ip_adapter`. The image encoder is
`transformers`' CLIPVisionModelWithProjection, as in Diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import torch
from torch import nn

from ..models.ip_adapter import (
    ImageProjection,
    MultiIPAdapterImageProjection,
)
from ..models.ip_adapter_weights import (
    check_state_dict,
    load_ip_adapter_weights,
    read_ip_adapter_file,
    set_scales,
    unload_ip_adapter_weights,
)

# Hub / file arguments `load_ip_adapter` takes (as Diffusers'); anything else is a TypeError.
_HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token")
# Accepted for Diffusers compatibility, no effect here: weights are never initialised randomly first.
_NO_EFFECT_KWARGS = ("low_cpu_mem_usage", "force_download", "proxies")


class IPAdapterMixin:
    """Diffusers' `IPAdapterMixin` for the SD pipelines (a UNet, optional `image_encoder` and `feature_extractor`)."""

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, Any] | list[Any],
        subfolder: str | list[str],
        weight_name: str | list[str],
        image_encoder_folder: str | None = "image_encoder",
        **kwargs: Any,
    ) -> None:
        """Load one or several IP-Adapters (lists of sources / subfolders / weight names), replacing those loaded.

        The image encoder (CLIPVisionModelWithProjection) comes from `<source>/<subfolder>/<image_encoder_folder>`
        (or `<source>/<image_encoder_folder>` when it names a path with "/") unless the pipeline has one or
        `image_encoder_folder=None` (then only `ip_adapter_image_embeds` can be used)."""
        unknown = sorted(set(kwargs) - set(_HUB_KWARGS) - set(_NO_EFFECT_KWARGS))
        if unknown:
            raise TypeError(f"load_ip_adapter got unexpected argument(s) {unknown}; allowed: "
                            f"{', '.join(_HUB_KWARGS + _NO_EFFECT_KWARGS)}")  # fmt: skip
        hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        weight_names = weight_name if isinstance(weight_name, list) else [weight_name]
        sources = pretrained_model_name_or_path_or_dict
        sources = sources if isinstance(sources, list) else [sources]
        sources = sources * len(weight_names) if len(sources) == 1 else sources
        subfolders = subfolder if isinstance(subfolder, list) else [subfolder]
        subfolders = subfolders * len(weight_names) if len(subfolders) == 1 else subfolders
        if len(weight_names) != len(sources):
            raise ValueError("`weight_name` and `pretrained_model_name_or_path_or_dict` must have the same length.")
        if len(weight_names) != len(subfolders):
            raise ValueError("`weight_name` and `subfolder` must have the same length.")
        state_dicts = []
        for source, name, sub in zip(sources, weight_names, subfolders):
            if isinstance(source, Mapping):
                state_dicts.append(check_state_dict(source, "state dict"))
            else:
                state_dicts.append(read_ip_adapter_file(source, sub, name, **hub))
            self._maybe_load_image_encoder(source, sub, image_encoder_folder, hub)
        load_ip_adapter_weights(self.unet, state_dicts)

    def _maybe_load_image_encoder(self, source: Any, subfolder: str | None, folder: str | None, hub: dict) -> None:
        if getattr(self, "image_encoder", None) is None:
            if folder is None:
                pass  # embeddings only (`ip_adapter_image_embeds`), as Diffusers warns
            elif isinstance(source, Mapping):
                raise ValueError("`image_encoder` cannot be loaded because `pretrained_model_name_or_path_or_dict` "
                                 "is a state dict; load it yourself or pass image_encoder_folder=None")  # fmt: skip
            else:
                from transformers import CLIPVisionModelWithProjection

                sub = folder if "/" in folder else PurePosixPath(subfolder or "", folder).as_posix()
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    str(source), subfolder=sub, dtype=self.dtype, **hub
                ).to(self.device)
                self.register_modules(image_encoder=encoder)
        if getattr(self, "feature_extractor", None) is None:
            from transformers import CLIPImageProcessor

            encoder = getattr(self, "image_encoder", None)
            size = encoder.config.image_size if encoder is not None else 224  # FaceID needs no encoder: CLIP's size
            self.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))

    def set_ip_adapter_scale(self, scale: Any) -> None:
        """A number, one per adapter, or Diffusers' per-block dicts; a buffer update (no recompile)."""
        set_scales(self.unet, scale)

    def unload_ip_adapter(self) -> None:
        """Remove the adapters and the image encoder (the feature extractor stays: the safety checker uses it)."""
        unload_ip_adapter_weights(self.unet)
        if getattr(self, "image_encoder", None) is not None:
            self.register_modules(image_encoder=None)

    # --- the call -----------------------------------------------------------------------------------------------------
    def encode_image(
        self,
        image: Any,
        device: torch.device | str,
        num_images_per_prompt: int,
        output_hidden_states: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusers' method: (image embeddings, their unconditional counterpart). Pooled embeddings (zeros as the
        unconditional ones) or, with output_hidden_states, the penultimate hidden states (of a black image)."""
        if self.image_encoder is None:
            raise ValueError("ip_adapter_image needs an image_encoder (load_ip_adapter loads one unless "
                             "image_encoder_folder=None); or pass ip_adapter_image_embeds")  # fmt: skip
        dtype = next(self.image_encoder.parameters()).dtype
        if not torch.is_tensor(image):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            cond = self.image_encoder(image, output_hidden_states=True).hidden_states[-2]
            uncond = self.image_encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
            return (
                cond.repeat_interleave(num_images_per_prompt, dim=0),
                uncond.repeat_interleave(num_images_per_prompt, dim=0),
            )
        embeds = self.image_encoder(image).image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, torch.zeros_like(embeds)

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device | str,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:
        """Diffusers' method: one tensor per adapter, (num_images_per_prompt [x2 when guiding], images, ...); given
        embeddings hold [negative; positive] halves when guiding."""
        layers = self.ip_adapter_projections()
        positive, negative = [], []
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            if len(images) != len(layers):
                raise ValueError(
                    f"`ip_adapter_image` must have same length as the number of IP Adapters. Got {len(images)} "
                    f"images and {len(layers)} IP Adapters."
                )
            for image, layer in zip(images, layers):
                cond, uncond = self.encode_image(image, device, 1, not isinstance(layer, ImageProjection))
                positive.append(cond[None])
                negative.append(uncond[None])
        else:
            for embeds in ip_adapter_image_embeds:
                if do_classifier_free_guidance:
                    uncond, embeds = embeds.chunk(2)
                    negative.append(uncond)
                positive.append(embeds)
        out = []
        for i, embeds in enumerate(positive):
            embeds = torch.cat([embeds] * num_images_per_prompt)
            if do_classifier_free_guidance:
                embeds = torch.cat([torch.cat([negative[i]] * num_images_per_prompt), embeds])
            out.append(embeds.to(device=device))
        return out

    def ip_adapter_projections(self) -> list[nn.Module]:
        """The UNet's IP-Adapter projections; a ValueError when none is loaded."""
        proj = getattr(self.unet, "encoder_hid_proj", None)
        if not isinstance(proj, MultiIPAdapterImageProjection):
            raise ValueError("ip_adapter_image / ip_adapter_image_embeds given, but no IP-Adapter is loaded "
                             "(pipe.load_ip_adapter(...) first)")  # fmt: skip
        return list(proj.image_projection_layers)


def check_ip_adapter_args(image: Any, embeds: Any) -> None:
    """What needs no pipeline: not both; embeddings a list of finite 3-D / 4-D tensors."""
    if image is not None and embeds is not None:
        raise ValueError(
            "Provide either `ip_adapter_image` or `ip_adapter_image_embeds`. Cannot leave both `ip_adapter_image` and "
            "`ip_adapter_image_embeds` defined."
        )
    if embeds is None:
        return
    if not isinstance(embeds, list):
        raise ValueError(f"`ip_adapter_image_embeds` has to be of type `list` but is {type(embeds)}")
    for i, e in enumerate(embeds):
        if not torch.is_tensor(e) or e.ndim not in (3, 4):
            got = f"{e.ndim}D" if torch.is_tensor(e) else type(e).__name__
            raise ValueError(f"`ip_adapter_image_embeds` has to be a list of 3D or 4D tensors but [{i}] is {got}")
        if e.is_floating_point() and not torch.isfinite(e).all():
            raise ValueError(f"ip_adapter_image_embeds[{i}] holds nan/inf values")
