"""Textual inversion with Diffusers' API: `pipe.load_textual_inversion`, `unload_textual_inversion`,
`maybe_convert_prompt`.

Formats: Diffusers' `learned_embeds.safetensors` / `.bin` ({token: (n, dim) or (dim,)}), A1111's `.pt`
({"string_to_param": {"*": (n, dim)}, "name": ...}, read with `torch.load(weights_only=True)`) and `.safetensors`
({"emb_params": (n, dim)}, needs `token=`), a tensor (needs `token=`), or a list of those. A multi-vector embedding
adds the tokens `tok`, `tok_1`, ..., `tok_{n-1}`, and prompts mentioning `tok` are expanded to all of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..hub import given_weight_file, resolve_dir
from ..utils import concurrency
from ..utils.torch_utils import first_non_finite

TI_WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
_HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "hf_token", "subfolder", "weight_name", "use_safetensors")


def _read(
    source: Any, weight_name: str | None, subfolder: str | None, use_safetensors: bool | None, **hub: Any
) -> tuple[Any, str]:
    """(state dict or tensor, description) of one textual-inversion source."""
    if isinstance(source, (Mapping, torch.Tensor)):
        return source, "(a state dict)" if isinstance(source, Mapping) else "(a tensor)"
    file = given_weight_file(source, weight_name, subfolder, **hub)
    if file is None:
        names = {None: TI_WEIGHT_NAMES, True: TI_WEIGHT_NAMES[:1], False: TI_WEIGHT_NAMES[::-1]}[use_safetensors]
        patterns = [f"{subfolder}/{n}" if subfolder else n for n in names]
        folder = resolve_dir(source, subfolder, allow_patterns=patterns, **hub)
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no textual inversion in {source!r}: looked for {', '.join(TI_WEIGHT_NAMES)}; "
                                    "pass weight_name= for another file name")  # fmt: skip
        file = found[0]
    try:
        if file.name.endswith(".safetensors"):
            import safetensors.torch

            return safetensors.torch.load_file(str(file), device="cpu"), str(file)
        return torch.load(str(file), map_location="cpu", weights_only=True), str(file)
    except Exception as e:
        raise ValueError(f"could not read textual inversion file {file}: {type(e).__name__}: {e}") from e


def _token_and_embedding(state: Any, token: str | None, source: str) -> tuple[str, torch.Tensor]:
    """The token (given, or stored in the file) and the (n, dim) embedding of one loaded file."""
    if isinstance(state, torch.Tensor):
        stored, embedding = None, state
    elif "string_to_param" in state:  # A1111 .pt
        stored, embedding = state.get("name"), state["string_to_param"]["*"]
    elif set(state) == {"emb_params"}:  # A1111 .safetensors: the token is the file's name, not stored
        stored, embedding = None, state["emb_params"]
    elif len(state) == 1:  # Diffusers: {token: embedding}
        stored, embedding = next(iter(state.items()))
    else:
        raise ValueError(
            f"{source}: not a textual inversion (expected one {{token: embedding}} entry, A1111's string_to_param or "
            f"emb_params); keys: {sorted(state)[:10]}"
        )
    token = token if token is not None else stored
    if token is None:
        raise ValueError(f"{source}: the embedding does not name its token: pass token=")
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or embedding.shape[0] == 0:
        raise ValueError(f"{source}: the embedding must be a (dim,) or (vectors, dim) tensor, got {embedding!r:.100}")
    bad = first_non_finite({token: embedding})
    if bad is not None:
        raise ValueError(f"{source}: the embedding of token {token!r} holds {bad[1]} non-finite value(s) (nan/inf) "
                         f"out of {bad[2]}; nothing was loaded")  # fmt: skip
    return token, embedding.detach().reshape(-1, embedding.shape[-1])


class TextualInversionLoaderMixin:
    """Diffusers' textual-inversion API for the pipelines with a CLIP tokenizer and text encoder."""

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer: Any) -> str | list[str]:
        """Expand each multi-vector token `tok` of the prompt(s) to `tok tok_1 ... tok_{n-1}` (as Diffusers)."""
        if isinstance(prompt, list):
            return [self._maybe_convert_prompt(p, tokenizer) for p in prompt]
        return self._maybe_convert_prompt(prompt, tokenizer)

    def _maybe_convert_prompt(self, prompt: str, tokenizer: Any) -> str:
        added = tokenizer.added_tokens_encoder
        with concurrency.call_lock(tokenizer):  # transformers' tokenizers are not thread-safe
            tokens = set(tokenizer.tokenize(prompt))
        for token in tokens:
            if token in added:
                replacement, i = token, 1
                while f"{token}_{i}" in added:
                    replacement += f" {token}_{i}"
                    i += 1
                prompt = prompt.replace(token, replacement)
        return prompt

    def _text_models(self, tokenizer: Any, text_encoder: nn.Module | None, what: str) -> tuple[Any, nn.Module]:
        """The tokenizer and text encoder to change (the given ones, else the pipeline's), idle (no call running)."""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError(f"{type(self).__name__}.{what} needs a tokenizer and a text_encoder")
        for model in (tokenizer, text_encoder):
            concurrency.check_idle(model, what)
        return tokenizer, text_encoder

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: Any,
        token: str | list[str] | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the embedding(s) of a file, folder, Hub id, state dict or tensor (or a list of them) as new tokens.

        kwargs: weight_name, subfolder, cache_dir, local_files_only, revision, hf_token.
        """
        unknown = sorted(set(kwargs) - set(_HUB_KWARGS))
        if unknown:
            raise TypeError(f"load_textual_inversion got unexpected argument(s) {unknown}; allowed: {_HUB_KWARGS}")
        tokenizer, text_encoder = self._text_models(tokenizer, text_encoder, "load_textual_inversion")
        sources = pretrained_model_name_or_path
        sources = list(sources) if isinstance(sources, list) else [sources]
        tokens = list(token) if isinstance(token, list) else [token] * len(sources)
        hub = {("token" if k == "hf_token" else k): v for k, v in kwargs.items()}
        weight_name, subfolder = hub.pop("weight_name", None), hub.pop("subfolder", None)
        use_safetensors = hub.pop("use_safetensors", None)
        loaded = [_read(s, weight_name, subfolder, use_safetensors, **hub) for s in sources]
        if len(loaded) == 1 and isinstance(loaded[0][0], torch.Tensor) and len(tokens) > 1:
            # One (n, dim) tensor with n tokens: one vector per token (Diffusers).
            tensor, what = loaded[0]
            loaded = [(row, what) for row in tensor]
        if len(tokens) != len(loaded):
            raise ValueError(f"{len(loaded)} embeddings but {len(tokens)} tokens ({tokens}): pass one token each")

        vocab = tokenizer.get_vocab()
        new_tokens: list[str] = []
        vectors: list[torch.Tensor] = []
        dim = text_encoder.get_input_embeddings().weight.shape[-1]
        for (state, what), tok in zip(loaded, tokens):
            tok, embedding = _token_and_embedding(state, tok, what)
            names = [tok] + [f"{tok}_{i}" for i in range(1, embedding.shape[0])]
            clash = [n for n in names + [f"{tok}_1"] if n in vocab or n in new_tokens]
            if clash:
                raise ValueError(f"{what}: token {clash[0]!r} is already in the tokenizer's vocabulary: choose another "
                                 "token= or unload_textual_inversion() it first")  # fmt: skip
            if embedding.shape[-1] != dim:
                raise ValueError(f"{what}: embedding size {embedding.shape[-1]} does not fit the text encoder ({dim})")
            new_tokens += names
            vectors += list(embedding)

        # Checked: now change the tokenizer and the embedding matrix (Diffusers' order, so token ids match).
        text_encoder.resize_token_embeddings(len(tokenizer) + len(new_tokens))
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for tok, vector in zip(new_tokens, vectors):
                tokenizer.add_tokens(tok)
                weight[tokenizer.convert_tokens_to_ids(tok)] = vector.to(weight)

    def unload_textual_inversion(
        self, tokens: str | list[str] | None = None, tokenizer: Any = None, text_encoder: nn.Module | None = None
    ) -> None:
        """Remove the given added tokens (default: every non-special added token) and their embedding rows."""
        tokenizer, text_encoder = self._text_models(tokenizer, text_encoder, "unload_textual_inversion")
        wanted = None if tokens is None else ({tokens} if isinstance(tokens, str) else set(tokens))
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
        remove = {i: t.content for i, t in added.items() if wanted is None or t.content in wanted}
        if wanted is not None and set(remove.values()) != wanted:
            raise ValueError(f"unload_textual_inversion: token(s) {sorted(wanted - set(remove.values()))} were not "
                             f"added; added tokens: {sorted(t.content for t in added.values())}")  # fmt: skip
        if not remove:
            return
        last_special = max(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        _remove_added_tokens(tokenizer, set(remove.values()), last_special)
        # Keep the base vocabulary and the remaining added rows, in order (their ids shift down as in the tokenizer).
        weight = text_encoder.get_input_embeddings().weight
        keep = [i for i in range(weight.shape[0]) if i <= last_special or i not in remove]
        embedding = nn.Embedding(len(keep), weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            embedding.weight.copy_(weight[keep])
        text_encoder.set_input_embeddings(embedding)


def _remove_added_tokens(tokenizer: Any, contents: set[str], last_special: int) -> None:
    """Drop added tokens from a (fast) tokenizer and renumber the remaining added ones after the special tokens."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TypeError(f"unload_textual_inversion needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer)}")
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    next_id, kept = last_special + 1, []
    for entry in data.get("added_tokens", []):
        if entry.get("content") in contents:
            continue
        if not entry.get("special", False):
            entry["id"], next_id = next_id, next_id + 1
        kept.append(entry)
    data["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
