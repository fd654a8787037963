"""Prompt encoding shared by every CLIP-conditioned pipeline (text-to-image, img2img, inpainting, ControlNet, x4 upscaler).

Same results as Diffusers' `encode_prompt`, including its quirks: negative prompts are padded to the prompt embeddings'
length and are encoded without `clip_skip`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..utils import concurrency
from .pipeline_utils import check_positive_int

logger = logging.getLogger(__name__)

PromptInput = str | list[str] | None


def _batch_of(value: str | list[str]) -> int:
    return 1 if isinstance(value, str) else len(value)


def check_text(name: str, value: Any) -> None:
    ok = isinstance(value, str) or (
        isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise ValueError(f"{name} must be a str or a non-empty list of str, got {value!r}")


def _check_embeds(name: str, value: Any) -> None:
    if not (isinstance(value, torch.Tensor) and value.ndim == 3):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape (batch, tokens, hidden), got {shape}")


def check_prompt_inputs(
    prompt: PromptInput,
    negative_prompt: PromptInput = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> int:
    """Validate the prompt arguments of a pipeline call; returns the number of prompts."""
    if (prompt is None) == (prompt_embeds is None):
        given = "both" if prompt is not None else "neither"
        raise ValueError(f"pass exactly one of prompt and prompt_embeds, got {given}")
    if prompt is not None:
        check_text("prompt", prompt)
        batch = _batch_of(prompt)
    else:
        _check_embeds("prompt_embeds", prompt_embeds)
        batch = prompt_embeds.shape[0]
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds, got both")
    if negative_prompt is not None:
        check_text("negative_prompt", negative_prompt)
        if prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"negative_prompt must have the type of prompt ({type(prompt).__name__}), "
                f"got {type(negative_prompt).__name__}: {negative_prompt!r}"
            )
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts: {negative_prompt!r}"
            )
    if negative_prompt_embeds is not None:
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds)
        if prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        if negative_prompt_embeds.shape[0] != batch:
            raise ValueError(
                f"negative_prompt_embeds has batch {negative_prompt_embeds.shape[0]} but there are {batch} prompts"
            )
    return batch


def check_clip_skip(clip_skip: Any, text_encoder: Any) -> None:
    if clip_skip is None:
        return
    layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 0:
        raise ValueError(f"clip_skip must be None or an int >= 0, got {clip_skip!r}")
    if layers is not None and clip_skip >= layers:
        raise ValueError(f"clip_skip={clip_skip} must be smaller than the text encoder's {layers} layers")


def encode_text(
    tokenizer: Any,
    text_encoder: Any,
    texts: list[str],
    device: torch.device,
    *,
    max_length: int | None = None,
    clip_skip: int | None = None,
    attention_mask: bool | None = None,
    argument: str = "prompt",
) -> torch.Tensor:
    """Token embeddings (batch, max_length, hidden) of `texts`, padded to max_length (tokenizer.model_max_length).

    attention_mask: whether the encoder sees the padding mask; None reads the config's `use_attention_mask` (CLIP).
    DeepFloyd IF's T5 always gets it.
    argument: the call argument `texts` came from, named by the truncation warning.
    """
    tokens = tokenize(tokenizer, texts, max_length, argument)
    ids = tokens.input_ids
    if attention_mask is None:
        attention_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if attention_mask else None
    if clip_skip is None:
        return text_encoder(ids.to(device), attention_mask=mask)[0]
    # Diffusers' clip_skip: the hidden state `clip_skip` layers before the last, through the final layer norm
    # (transformers 5 moved it from `text_model.final_layer_norm` to the model itself).
    hidden = text_encoder(ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden[-(clip_skip + 1)])


def tokenize(tokenizer: Any, texts: list[str], max_length: int | None, argument: str) -> Any:
    """`texts` padded / cut to max_length (tokenizer.model_max_length if None); a cut text is logged."""
    max_length = max_length or tokenizer.model_max_length
    # transformers' tokenizers set their padding / truncation on a shared backend for each call: one call at a time
    with concurrency.call_lock(tokenizer):
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        _warn_if_truncated(tokenizer, texts, tokens.input_ids, argument)
    return tokens


def encode_hidden(
    tokenizer: Any,
    text_encoder: Any,
    texts: list[str],
    device: torch.device,
    *,
    layer: int,
    max_length: int | None = None,
    argument: str = "prompt",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states[layer], the encoder's first output) of `texts`, no final layer norm and no padding mask: SDXL's
    text features (the penultimate layer, -2) and, from a CLIPTextModelWithProjection, its pooled projection."""
    ids = tokenize(tokenizer, texts, max_length, argument).input_ids
    out = text_encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[layer], out[0]


TRUNCATED_SHOWN = 80  # characters of the cut text a truncation warning shows


def _warn_if_truncated(tokenizer: Any, texts: list[str], ids: torch.Tensor, argument: str) -> None:
    """One warning per text cut to the encoder's length: the argument, its token counts, the start of what was cut."""
    full = tokenizer(texts, padding="longest", return_tensors="pt")
    limit = ids.shape[-1]
    if full.input_ids.shape[-1] <= limit:
        return
    for i, n in enumerate(full.attention_mask.sum(-1).tolist()):
        if n <= limit:
            continue
        cut = tokenizer.decode(full.input_ids[i, limit - 1 : n - 1])  # what the end token replaced, up to the end
        shown = cut if len(cut) <= TRUNCATED_SHOWN else cut[:TRUNCATED_SHOWN] + "..."
        where = f"{argument}[{i}]" if len(texts) > 1 else argument
        logger.warning(
            "%s has %d tokens; the text encoder takes %d, so the last %d were cut: %r",
            where, n, limit, n - limit, shown,
        )  # fmt: skip


def _per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def encode_prompt(
    tokenizer: Any,
    text_encoder: Any,
    prompt: PromptInput,
    device: torch.device | str,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt: PromptInput = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    attention_mask: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, negative_prompt_embeds), each repeated `num_images_per_prompt` times per prompt.

    negative_prompt_embeds is None without classifier-free guidance; when guiding without a negative prompt it embeds
    "". Embeddings come in the text encoder's dtype (`dtype` when there is no text encoder). max_length and
    attention_mask go to `encode_text` for the prompt (DeepFloyd IF: 77 tokens, masked T5).
    """
    batch = check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    check_positive_int("num_images_per_prompt", num_images_per_prompt)
    check_clip_skip(clip_skip, text_encoder)
    device = torch.device(device)
    needs_encoder = prompt is not None or (do_classifier_free_guidance and negative_prompt_embeds is None)
    if needs_encoder and (tokenizer is None or text_encoder is None):
        raise ValueError("this pipeline has no tokenizer/text_encoder: pass prompt_embeds (and negative_prompt_embeds)")
    if prompt_embeds is None:
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompt_embeds = encode_text(
            tokenizer,
            text_encoder,
            texts,
            device,
            max_length=max_length,
            clip_skip=clip_skip,
            attention_mask=attention_mask,
        )
    dtype = text_encoder.dtype if text_encoder is not None else dtype or prompt_embeds.dtype
    prompt_embeds = _per_image(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
    if not do_classifier_free_guidance:
        return prompt_embeds, None
    if negative_prompt_embeds is None:
        negatives = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
        negative_prompt_embeds = encode_text(
            tokenizer,
            text_encoder,
            negatives,
            device,
            max_length=prompt_embeds.shape[1],
            attention_mask=attention_mask,
            argument="negative_prompt",
        )
    negative_prompt_embeds = _per_image(negative_prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
    return prompt_embeds, negative_prompt_embeds
