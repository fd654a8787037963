"""The one Attention module against diffusers' Attention, with both processor kinds."""

import pytest
import torch
from conftest import assert_close_rel
from diffusers.models.attention_processor import Attention as DAttention
from diffusers.models.attention_processor import AttnAddedKVProcessor as DAddedKV

from rapiddiff.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
)

CASES = [
    dict(query_dim=32, heads=2, dim_head=16),
    dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, upcast_attention=True),
    dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_attention_matches_diffusers(kw, processor):
    torch.manual_seed(0)
    ref = DAttention(**kw)
    ours = Attention(**kw, processor=processor())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 32, 3, 5)
    ctx = torch.randn(3, 7, kw["cross_attention_dim"]) if "cross_attention_dim" in kw else None
    assert_close_rel(ours(x, ctx), ref(x, ctx), 1e-5)


@pytest.mark.parametrize("processor", [AttnAddedKVProcessor, AttnAddedKVProcessor2_0])
@pytest.mark.parametrize("only_cross", [False, True])
def test_added_kv_attention_matches_diffusers(processor, only_cross):
    torch.manual_seed(0)
    kw = dict(
        query_dim=32,
        cross_attention_dim=32,
        heads=2,
        dim_head=16,
        added_kv_proj_dim=24,
        norm_num_groups=8,
        bias=True,
        upcast_softmax=True,
        cross_attention_norm="group_norm",
        cross_attention_norm_num_groups=8,
        only_cross_attention=only_cross,
    )
    ref = DAttention(**kw, processor=DAddedKV())
    ours = Attention(**kw, processor=processor())
    ours.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 7, 24)
    assert_close_rel(ours(x, ctx), ref(x, ctx), 1e-5)


def test_processors_agree_and_masks_apply():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    mask = torch.zeros(2, 1, 6)
    mask[:, :, 3:] = -10000.0
    outs = []
    for p in (AttnProcessor(), AttnProcessor2_0()):
        attn.set_processor(p)
        outs.append((attn(x, ctx), attn(x, ctx, attention_mask=mask)))
    assert_close_rel(outs[0][0], outs[1][0], 1e-5)
    assert_close_rel(outs[0][1], outs[1][1], 1e-5)
    assert (outs[0][0] - outs[0][1]).abs().max() > 1e-3  # the mask changed the result
    # masking the last keys == dropping them
    assert_close_rel(outs[1][1], attn(x, ctx[:, :3]), 1e-5)


def test_wrong_processor_kind_is_a_clear_error():
    attn = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=8, norm_num_groups=4)
    with pytest.raises(TypeError, match="AttnAddedKVProcessor2_0"):
        attn.set_processor(AttnProcessor())
    with pytest.raises(TypeError, match="callable"):
        attn.set_processor(42)
    assert isinstance(attn.processor, AttnAddedKVProcessor2_0)
    assert type(attn.vanilla_processor()) is AttnAddedKVProcessor
