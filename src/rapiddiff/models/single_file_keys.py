"""The key table between the original Stable Diffusion layout and Diffusers' (see single_file.py here and in the
loaders): for each model,
`*_rules(config)` lists `Rule`s mapping a key prefix of the original layout to Diffusers' (block indices follow from
the config), with renames below the prefix and a tensor transform; `to_diffusers` applies a table, `to_original`
applies it backwards (to write original-layout files, e.g. in the tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..configuration import per_block

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a Hugging Face CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: the OpenCLIP ViT-H text tower
CONTROLNET_PREFIX = "control_model."
# SDXL: `conditioner.embedders.N.`: the base's CLIP ViT-L (Hugging Face layout) then OpenCLIP bigG; the refiner's
# embedder 0 is OpenCLIP bigG alone.
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
XL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# Which preset holds the configs of each detected architecture.


# --- the table -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """`original` key prefix (or whole key) <-> `diffusers` prefix; `inner` renames the rest of the key, original ->
    Diffusers, by prefix; `transform` names an entry of TRANSFORMS applied to the tensors of this rule."""

    original: str
    diffusers: str
    inner: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transform: str | None = None


UNET_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
OPENCLIP_LAYER = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.in_proj_": "self_attn.{qkv}_proj.",  # one fused q/k/v tensor <-> three
}


def _conv1x1_to_linear(t: torch.Tensor, forward: bool) -> torch.Tensor:
    """The original VAE attention uses 1x1 convolutions where Diffusers has linear layers."""
    if forward:
        return t[:, :, 0, 0] if t.ndim == 4 else t
    return t[:, :, None, None] if t.ndim == 2 else t


TRANSFORMS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "conv1x1_to_linear": _conv1x1_to_linear,
    # OpenCLIP's text_projection multiplies from the right (x @ P): a Linear's weight is P transposed
    "transpose": lambda t, forward: t.T.contiguous(),
}


def _blocks_with_attention(block_types: tuple[str, ...]) -> list[bool]:
    return ["CrossAttn" in t for t in block_types]


def _unet_down_rules(config: Mapping[str, Any], prefix: str = "") -> tuple[list[Rule], list[int]]:
    """The encoder half shared by the UNet and the ControlNet: time embedding, conv_in, input blocks, middle block.
    Also returns, for each input block, its index (ControlNet's zero convolutions follow them)."""
    n = len(config["block_out_channels"])
    layers = per_block(config["layers_per_block"], n, "layers_per_block")
    attn = _blocks_with_attention(config["down_block_types"])
    rules = [
        Rule("time_embed.0.", "time_embedding.linear_1."),
        Rule("time_embed.2.", "time_embedding.linear_2."),
        Rule("input_blocks.0.0.", "conv_in."),
        Rule("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
        Rule("middle_block.1.", "mid_block.attentions.0."),
        Rule("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL: the pooled-text + size embedding
        rules += [Rule("label_emb.0.0.", "add_embedding.linear_1."), Rule("label_emb.0.2.", "add_embedding.linear_2.")]
    i = 1
    for b in range(n):
        for j in range(layers[b]):
            rules.append(Rule(f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.", UNET_RESNET))
            if attn[b]:
                rules.append(Rule(f"input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{j}."))
            i += 1
        if b < n - 1:
            rules.append(Rule(f"input_blocks.{i}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
            i += 1
    return [dataclasses.replace(r, original=prefix + r.original) for r in rules], list(range(i))


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    rules, _ = _unet_down_rules(config, UNET_PREFIX)
    n = len(config["block_out_channels"])
    layers = per_block(config["layers_per_block"], n, "layers_per_block")[::-1]
    attn = _blocks_with_attention(config["up_block_types"])
    p = UNET_PREFIX
    rules += [Rule(p + "out.0.", "conv_norm_out."), Rule(p + "out.2.", "conv_out.")]
    i = 0
    for b in range(n):
        for j in range(layers[b] + 1):
            rules.append(Rule(f"{p}output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{j}.", UNET_RESNET))
            if attn[b]:
                rules.append(Rule(f"{p}output_blocks.{i}.1.", f"up_blocks.{b}.attentions.{j}."))
            if j == layers[b] and b < n - 1:
                rules.append(
                    Rule(f"{p}output_blocks.{i}.{2 if attn[b] else 1}.conv.", f"up_blocks.{b}.upsamplers.0.conv.")
                )
            i += 1
    return rules


def controlnet_rules(config: Mapping[str, Any], prefix: str = CONTROLNET_PREFIX) -> list[Rule]:
    rules, blocks = _unet_down_rules(config, prefix)
    rules += [Rule(f"{prefix}zero_convs.{k}.0.", f"controlnet_down_blocks.{k}.") for k in blocks]
    rules.append(Rule(f"{prefix}middle_block_out.0.", "controlnet_mid_block."))
    # input_hint_block: conv, SiLU, (conv, SiLU, strided conv, SiLU) per channel step, conv: convolutions at even indices
    n_hint = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    rules.append(Rule(f"{prefix}input_hint_block.0.", "controlnet_cond_embedding.conv_in."))
    rules += [
        Rule(f"{prefix}input_hint_block.{2 * (k + 1)}.", f"controlnet_cond_embedding.blocks.{k}.")
        for k in range(n_hint)
    ]
    rules.append(Rule(f"{prefix}input_hint_block.{2 * (n_hint + 1)}.", "controlnet_cond_embedding.conv_out."))
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    rules = [Rule(VAE_PREFIX + k, k) for k in ("quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        p = f"{VAE_PREFIX}{side}."
        rules += [
            Rule(p + "conv_in.", f"{side}.conv_in."),
            Rule(p + "conv_out.", f"{side}.conv_out."),
            Rule(p + "norm_out.", f"{side}.conv_norm_out."),
            Rule(p + "mid.block_1.", f"{side}.mid_block.resnets.0.", VAE_RESNET),
            Rule(p + "mid.block_2.", f"{side}.mid_block.resnets.1.", VAE_RESNET),
            Rule(p + "mid.attn_1.", f"{side}.mid_block.attentions.0.", VAE_ATTENTION, "conv1x1_to_linear"),
        ]
    for b in range(n):
        p, d = f"{VAE_PREFIX}encoder.down.{b}.", f"encoder.down_blocks.{b}."
        rules += [Rule(f"{p}block.{j}.", f"{d}resnets.{j}.", VAE_RESNET) for j in range(layers)]
        if b < n - 1:
            rules.append(Rule(f"{p}downsample.conv.", f"{d}downsamplers.0.conv."))
        # the original decoder counts its levels from the lowest resolution up
        p, d = f"{VAE_PREFIX}decoder.up.{b}.", f"decoder.up_blocks.{n - 1 - b}."
        rules += [Rule(f"{p}block.{j}.", f"{d}resnets.{j}.", VAE_RESNET) for j in range(layers + 1)]
        if b > 0:
            rules.append(Rule(f"{p}upsample.conv.", f"{d}upsamplers.0.conv."))
    return rules


def clip_rules(config: Mapping[str, Any], prefix: str = CLIP_PREFIX) -> list[Rule]:
    """SD 1.x (and SDXL's first encoder): the keys of a Hugging Face CLIPTextModel (older files lack the
    `text_model.` level)."""
    return [Rule(prefix + "text_model.", "text_model."), Rule(prefix, "text_model.")]


def openclip_rules(config: Mapping[str, Any], prefix: str = OPENCLIP_PREFIX) -> list[Rule]:
    """SD 2.x: OpenCLIP's text tower; Diffusers keeps its first `num_hidden_layers` layers (SD 2 uses the penultimate).
    SDXL's CLIPTextModelWithProjection (config `architectures`) also takes the text projection."""
    p = prefix
    rules = [
        Rule(p + "token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        Rule(p + "positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Rule(p + "ln_final.", "text_model.final_layer_norm."),
    ]
    rules += [
        Rule(f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", OPENCLIP_LAYER)
        for i in range(config["num_hidden_layers"])
    ]
    if "CLIPTextModelWithProjection" in (config.get("architectures") or ()):
        rules.append(Rule(p + "text_projection", "text_projection.weight", transform="transpose"))
    return rules


# Keys of the original layout that no Diffusers model holds: dropped on purpose.
DROPPED_ORIGINAL = (
    "position_ids",  # a buffer transformers rebuilds
    # a projection SD 2 does not use, layers past num_hidden_layers (matched rules come first), OpenCLIP's extras
    *(
        p + k
        for p in (OPENCLIP_PREFIX, XL_OPENCLIP_PREFIX, XL_REFINER_OPENCLIP_PREFIX)
        for k in ("text_projection", "logit_scale", "attn_mask", "visual.", "transformer.resblocks.")
    ),
)


# --- applying the table ----------------------------------------------------------------------------------------------
def _rename(rest: str, inner: Mapping[str, str]) -> str:
    for old in sorted(inner, key=len, reverse=True):
        if rest.startswith(old):
            return inner[old] + rest[len(old) :]
    return rest


def to_diffusers(
    state: Mapping[str, torch.Tensor], rules: list[Rule], what: str, owned: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Convert the keys of `state` that the rules cover. A key under one of the `owned` prefixes that no rule covers
    and that is not in DROPPED_ORIGINAL is an error naming it; keys of other models are left alone."""
    ordered = sorted(rules, key=lambda r: len(r.original), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        rule = next((r for r in ordered if key.startswith(r.original)), None)
        if rule is None:
            if key.startswith(owned) and not any(d in key for d in DROPPED_ORIGINAL):
                unknown.append(key)
            continue
        new = rule.diffusers + _rename(key[len(rule.original) :], rule.inner)
        if rule.transform:
            tensor = TRANSFORMS[rule.transform](tensor, True)
        if "{qkv}" in new:
            if tensor.shape[0] % 3:
                raise ValueError(f"{what}: {key} has shape {tuple(tensor.shape)}, not three fused q/k/v blocks")
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[new.replace("{qkv}", name)] = part
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(
            f"{what}: keys that the conversion table built from this config does not cover (a config of another "
            f"architecture?): {sorted(unknown)[:8]}"
        )
    return out


def to_original(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers`: a Diffusers state dict in the original layout."""
    ordered = sorted(rules, key=lambda r: len(r.diffusers), reverse=True)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        rule = next((r for r in ordered if key.startswith(r.diffusers)), None)
        if rule is None:
            raise KeyError(f"no rule maps {key} to the original layout")
        rest = key[len(rule.diffusers) :]
        if rule.transform:
            tensor = TRANSFORMS[rule.transform](tensor, False)
        inverse = {new: old for old, new in rule.inner.items() if "{qkv}" not in new}
        for old, new in rule.inner.items():  # "self_attn.q_proj.weight" -> part q of "attn.in_proj_weight"
            for c in "qkv" if "{qkv}" in new else ():
                if rest.startswith(new.replace("{qkv}", c)):
                    fused.setdefault(rule.original + old + rest[len(new.replace("{qkv}", c)) :], {})[c] = tensor
                    break
            else:
                continue
            break
        else:
            out[rule.original + _rename(rest, inverse)] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[c] for c in "qkv"])
    return out
