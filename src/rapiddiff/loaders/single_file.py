"""Single-file checkpoints in the original Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, ControlNet's `control_model.*`), read offline.

The conversion is one table: for each model, `*_rules(config)` lists `Rule`s, each mapping a key prefix of the original
layout to Diffusers' (the block indices follow from the config), with optional renames of the part of the key below
the prefix and a tensor transform. `to_diffusers` applies a table; `to_original` applies it backwards (used to write
original-layout files, e.g. by the tests). The architecture is detected from keys and shapes; the configs come from the
package's presets (`rapiddiff.presets`) or from `config=`, a local Diffusers folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration import per_block, read_json
from ..exports import exported_class
from ..models.modeling_utils import load_state_dict_file, resolve_dtype_arg
from ..presets import PRESETS_DIR

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a Hugging Face CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: the OpenCLIP ViT-H text tower
CONTROLNET_PREFIX = "control_model."

# Which preset holds the configs of each detected architecture.
PRESETS = {
    "v1": "stable-diffusion-v1-5",
    "v1-inpainting": "stable-diffusion-inpainting",
    "v2": "stable-diffusion-2-1",
    "controlnet-v1": "sd-controlnet-canny",
}


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


TRANSFORMS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {"conv1x1_to_linear": _conv1x1_to_linear}


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


def clip_rules(config: Mapping[str, Any]) -> list[Rule]:
    """SD 1.x: the keys of a Hugging Face CLIPTextModel (older files lack the `text_model.` level)."""
    return [Rule(CLIP_PREFIX + "text_model.", "text_model."), Rule(CLIP_PREFIX, "text_model.")]


def openclip_rules(config: Mapping[str, Any]) -> list[Rule]:
    """SD 2.x: OpenCLIP's text tower; Diffusers keeps its first `num_hidden_layers` layers (SD 2 uses the penultimate)."""
    p = OPENCLIP_PREFIX
    rules = [
        Rule(p + "token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        Rule(p + "positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Rule(p + "ln_final.", "text_model.final_layer_norm."),
    ]
    rules += [
        Rule(f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", OPENCLIP_LAYER)
        for i in range(config["num_hidden_layers"])
    ]
    return rules


# Keys of the original layout that no Diffusers model holds: dropped on purpose.
DROPPED_ORIGINAL = (
    "position_ids",  # a buffer transformers rebuilds
    OPENCLIP_PREFIX + "text_projection",
    OPENCLIP_PREFIX + "logit_scale",
    OPENCLIP_PREFIX + "attn_mask",
    OPENCLIP_PREFIX + "visual.",
    OPENCLIP_PREFIX + "transformer.resblocks.",  # layers past num_hidden_layers (matched rules come first)
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


# --- reading the file and finding the architecture --------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `.safetensors` or `.ckpt` / `.pt` / `.bin` file (pickles read with weights_only=True): the raw key -> tensor dict,
    plus `global_step` where a .ckpt stores it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: from_single_file reads one checkpoint file (from_pretrained reads folders)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint {str(path)!r} does not exist")
    data = load_state_dict_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    step = data.get("global_step")
    state = data.get("state_dict", data)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found (keys: {sorted(state)[:8]})")
    return {"state": tensors, "global_step": step if isinstance(step, int) else None}


def detect(state: Mapping[str, torch.Tensor], path: str) -> str:
    """The architecture of an original SD checkpoint, from its keys and shapes: "v1", "v1-inpainting", "v2", "v2-inpainting"."""
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        sample = ", ".join(sorted(state)[:5])
        raise ValueError(
            f"{path} is not a Stable Diffusion checkpoint in the original layout: no {UNET_PREFIX}input_blocks.0.0.weight "
            f"(first keys: {sample})"
        )
    context = [v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    v2 = any(k.startswith(OPENCLIP_PREFIX) for k in state) or 1024 in context
    kind = "v2" if v2 else "v1"
    return kind + ("-inpainting" if conv_in.shape[1] == 9 else "")


def config_folder(kind: str, config: str | os.PathLike | None) -> Path:
    """`config=` (a local Diffusers folder), else the package preset of the detected architecture."""
    if config is not None:
        folder = Path(os.path.expanduser(str(config)))
        if not folder.is_dir():
            raise FileNotFoundError(f"config={str(config)!r} must be a local Diffusers folder (offline: no Hub ids)")
        return folder
    if kind not in PRESETS:
        raise ValueError(
            f"no preset config for a {kind} checkpoint (presets: {', '.join(PRESETS)}); pass config= a local Diffusers "
            "folder of the same architecture"
        )
    return PRESETS_DIR / PRESETS[kind]


def _model_config(folder: Path, name: str | None) -> dict[str, Any]:
    path = (folder / name if name else folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    return read_json(path)


# --- building the models ---------------------------------------------------------------------------------------------
def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | str) -> dict[str, torch.Tensor]:
    if dtype == "auto":
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_model(
    cls: type, config: Mapping[str, Any], state: dict[str, torch.Tensor], source: str, **overrides: Any
) -> Any:
    """A rapiddiff model built on the meta device from `config`, holding the converted tensors."""
    parsed = cls._parse_config(config, overrides, source=source)
    with torch.device("meta"):
        model = cls(parsed)
    model.load_checkpoint_state(state, source=source)
    return model.eval()


def load_text_encoder(config: Mapping[str, Any], state: dict[str, torch.Tensor], source: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer transformers builds
    model = CLIPTextModel(text_config)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 drops the level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config
        raise ValueError(f"{source}: {e}") from e
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: the text encoder does not fit {config.get('_name_or_path', 'its config')}: missing keys "
            f"{missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    return model.eval()


def convert_components(
    path: str | os.PathLike,
    config: str | os.PathLike | None,
    dtype: torch.dtype | str,
    skip: tuple[str, ...] = (),
) -> tuple[Path, dict[str, Any], str, int | None]:
    """Read an SD checkpoint: (config folder, {unet, vae, text_encoder} not in `skip`, kind, global_step)."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.unet_2d_condition import UNet2DConditionModel

    checkpoint = read_checkpoint(path)
    state, source = checkpoint["state"], str(path)
    kind = detect(state, source)
    folder = config_folder(kind, config)
    models: dict[str, Any] = {}
    if "unet" not in skip:
        unet_config = _model_config(folder, "unet")
        what = f"{source} (UNet, {kind}, config {folder / 'unet'})"
        converted = _cast(to_diffusers(state, unet_rules(unet_config), what, (UNET_PREFIX,)), dtype)
        models["unet"] = load_model(UNet2DConditionModel, unet_config, converted, what)
    if "vae" not in skip:
        vae_config = _model_config(folder, "vae")
        what = f"{source} (VAE, config {folder / 'vae'})"
        converted = _cast(to_diffusers(state, vae_rules(vae_config), what, (VAE_PREFIX,)), dtype)
        if not converted:
            raise ValueError(f"{source} has no VAE weights ({VAE_PREFIX}*): pass vae=")
        models["vae"] = load_model(AutoencoderKL, vae_config, converted, what)
    if "text_encoder" not in skip:
        text_config = _model_config(folder, "text_encoder")
        openclip = any(k.startswith(OPENCLIP_PREFIX) for k in state)
        rules = openclip_rules(text_config) if openclip else clip_rules(text_config)
        owned = (OPENCLIP_PREFIX if openclip else CLIP_PREFIX,)
        what = f"{source} (text encoder, config {folder / 'text_encoder'})"
        converted = to_diffusers(state, rules, what, owned)
        if not converted:
            raise ValueError(f"{source} has no text encoder weights (cond_stage_model.*): pass text_encoder=")
        models["text_encoder"] = load_text_encoder(text_config, _cast(converted, dtype), what)
    return folder, models, kind, checkpoint["global_step"]


def prediction_type_for(kind: str, given: str | None, global_step: int | None) -> str | None:
    """Diffusers' rule: SD 2.x is v-prediction unless the file says it is the 512 base model (global_step 875000)."""
    if given is not None:
        return given
    if kind.startswith("v2"):
        return "epsilon" if global_step == 875000 else "v_prediction"
    return None  # the config folder's scheduler decides


# --- entry points ---------------------------------------------------------------------------------------------------
def pipeline_from_single_file(
    pipeline_cls: type,
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    torch_dtype: Any = None,
    dtype: Any = None,
    prediction_type: str | None = None,
    **kwargs: Any,
) -> Any:
    """`Pipeline.from_single_file`: the converted UNet, VAE and text encoder, the other components from the config
    folder; keyword arguments named after components replace them (those given are not read from the file)."""
    load_dtype = resolve_dtype_arg(torch_dtype, dtype, f"{pipeline_cls.__name__}.from_single_file")
    components = set(pipeline_cls.component_names())
    if not {"unet", "vae", "text_encoder"} <= components:
        raise TypeError(
            f"{pipeline_cls.__name__}.from_single_file: single-file checkpoints load into Stable Diffusion pipelines "
            "(StableDiffusionPipeline, its img2img / inpainting / ControlNet variants)"
        )
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    for unsupported in ("original_config", "original_config_file"):
        if unsupported in kwargs:
            raise TypeError(
                f"{unsupported}= (a YAML of the original repository) is not supported: pass config= a Diffusers folder"
            )
    kwargs.pop("local_files_only", None)  # always offline
    given = tuple(k for k in kwargs if k in components)
    folder, models, kind, step = convert_components(path, config, load_dtype, skip=given)
    if "scheduler" not in kwargs:
        kwargs["scheduler"] = _scheduler(folder, prediction_type_for(kind, prediction_type, step))
    if (
        "safety_checker" in components
        and "safety_checker" not in kwargs
        and not _has_weights(folder / "safety_checker")
    ):
        logger.warning(
            "%s: no safety checker weights in %s; the pipeline has no safety checker (pass safety_checker= to add one)",
            path,
            folder,
        )
        kwargs["safety_checker"] = None
        kwargs.setdefault("requires_safety_checker", False)
    pipe = pipeline_cls.from_pretrained(
        folder, torch_dtype=None if load_dtype == "auto" else load_dtype, **models, **kwargs
    )
    pipe._name_or_path = str(path)
    return pipe


def controlnet_from_single_file(
    cls: type,
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    torch_dtype: Any = None,
    dtype: Any = None,
) -> Any:
    """`ControlNetModel.from_single_file`: an original ControlNet file (`control_model.*` or bare keys)."""
    load_dtype = resolve_dtype_arg(torch_dtype, dtype, f"{cls.__name__}.from_single_file")
    state, source = read_checkpoint(path)["state"], str(path)
    prefix = CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in state) else ""
    if prefix + "input_hint_block.0.weight" not in state:
        raise ValueError(f"{source} is not a ControlNet in the original layout: no {prefix}input_hint_block.0.weight")
    if config is not None:
        folder = Path(os.path.expanduser(str(config)))
        if not (folder / "config.json").is_file() and (folder / "controlnet" / "config.json").is_file():
            folder = folder / "controlnet"
    else:
        context = state[prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[-1]
        if context != 768:
            raise ValueError(
                f"{source}: a ControlNet for a cross-attention width of {context} (not SD 1.x): pass config="
            )
        folder = PRESETS_DIR / PRESETS["controlnet-v1"]
    net_config = _model_config(folder, None)
    converted = _cast(to_diffusers(state, controlnet_rules(net_config, prefix), source, (prefix,)), load_dtype)
    return load_model(cls, net_config, converted, f"{source} (ControlNet)")


def _scheduler(folder: Path, prediction_type: str | None) -> Any:
    path = folder / "scheduler" / "scheduler_config.json"
    values = read_json(path)
    cls = exported_class(values.get("_class_name", ""), str(path))
    overrides = {"prediction_type": prediction_type} if prediction_type is not None else {}
    return cls.from_config(values, **overrides)


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())
