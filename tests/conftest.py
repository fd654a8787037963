"""Shared test helpers: tiny checkpoints written by diffusers (the oracle) and parity assertions."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never download: everything is written by the tests themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, what: str = "output") -> None:
    """Max abs difference within `rel` times the scale (max abs) of the expected output."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x scale {scale:.3e}"


@pytest.fixture
def save_diffusers(tmp_path):
    """save_diffusers(model, name, **kw) -> folder: save a diffusers model/scheduler with save_pretrained."""

    def _save(obj, name: str = "model", **kwargs):
        path = tmp_path / name
        obj.save_pretrained(path, **kwargs)
        return path

    return _save
