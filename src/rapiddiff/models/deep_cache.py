"""DeepCache (Ma et al., CVPR 2024) on the UNet: reuse the deep features of the last full step.

The features of a UNet's deep levels change slowly from one denoising step to the next. A "full" step runs the whole
UNet and keeps the feature map entering the up-path layer the cache branch names; the following "shallow" steps run
only the levels above the branch (conv_in, the first down layers, the last up layers) and take that feature from the
cache. rapiddiff computes exactly what the `DeepCache` package (0.1.1) computes on Diffusers' UNet, as one traced
function per step kind: which steps are full is host data (a schedule made before the loop, see
`pipelines/deep_cache.py`), never a tensor read, so both kinds compile to one graph each.

Branch ids are DeepCache's: `cache_branch_id = 3 * level + layer`. On a shallow step, in down level `level` only
layers `< layer` run (with their attentions), and in the mirroring up block only layers `<= layer` counted from its
end; everything deeper (and the mid block) is the cache. `layer` counts the up block's resnets from its last one, so
the skips the fresh up layers read are exactly the fresh down layers' outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch

SKIP_MODES = ("uniform", "non-uniform")
LAYERS_PER_BRANCH_LEVEL = 3  # DeepCache's id arithmetic: level = id // 3, layer = id % 3, whatever the layer count


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's parameters, as `unet.enable_cache(DeepCacheConfig(...))` takes them.

    cache_interval: a full step every `cache_interval` steps (1: every step full, the uncached images).
    cache_branch_id: where the UNet is cut (0: only the outermost layers run on shallow steps, the fastest).
    skip_mode: "uniform" (full steps 0, interval, 2*interval... counted from the first step that runs) or
        "non-uniform" (the paper's schedule: ceil(steps / interval) full steps placed densely around step `center`,
        DeepCache's `sample_from_quad_center` with `pow`).
    """

    cache_interval: int = 3
    cache_branch_id: int = 0
    skip_mode: str = "uniform"
    pow: float = 1.4
    center: int = 15

    def __post_init__(self) -> None:
        for name in ("cache_interval", "cache_branch_id", "center"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "cache_interval" else 0):
                least = 1 if name == "cache_interval" else 0
                raise ValueError(f"DeepCacheConfig: {name}={value!r}; expected an int >= {least}")
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"DeepCacheConfig: skip_mode={self.skip_mode!r}; allowed: {', '.join(SKIP_MODES)}")
        if isinstance(self.pow, bool) or not isinstance(self.pow, (int, float)) or not 1 < self.pow < 10:
            raise ValueError(f"DeepCacheConfig: pow={self.pow!r}; expected a number in (1, 10)")


# --- the schedule of full steps ---------------------------------------------------------------------------------------
def quad_center_indices(total: int, count: int, center: int, power: float) -> list[int]:
    """The paper's non-uniform full steps: `count` indices in [0, total), dense around `center`, as DeepCache's
    `sample_from_quad_center` computes them (its arithmetic kept, complex roots of negative numbers included: the
    same indices). `power` is lowered by 0.02 until the indices are distinct; ValueError when it reaches 1."""
    while power > 1:
        # x**(1/p) of a negative Python number is complex, as in DeepCache; its cast to int32 keeps the real part
        values = np.linspace((-center) ** (1 / power), (total - center) ** (1 / power), count + 1) ** power
        indices = [0] + [int(x) + center for x in np.unique(np.real(values).astype(np.int32))[1:-1]]
        if len(indices) == count:
            return indices
        power -= 0.02
    raise ValueError(
        f"skip_mode='non-uniform': no power above 1 spreads {count} full steps over {total} steps around "
        f"center={center}; lower center or cache_interval"
    )


def step_positions(timesteps: list[float], run: int) -> list[int]:
    """Each of the last `run` timesteps' position counted as DeepCache counts it: the first index of its value in the
    scheduler's `timesteps`, less the first step's (a two-evaluation scheduler repeats a timestep: both evaluations
    get the position of the first)."""
    first: dict[float, int] = {}
    for k, value in enumerate(timesteps):
        first.setdefault(value, k)
    positions = [first[v] for v in timesteps[len(timesteps) - run :]]
    return [p - positions[0] for p in positions]


def full_steps(config: DeepCacheConfig, positions: list[int]) -> tuple[bool, ...]:
    """Per step of the loop: whether it runs the whole UNet (and refreshes the cache)."""
    if config.cache_interval == 1:
        return (True,) * len(positions)
    if config.skip_mode == "uniform":
        return tuple(p % config.cache_interval == 0 for p in positions)
    total = positions[-1] + 1 if positions else 0
    count = -(-total // config.cache_interval)
    if not 0 <= config.center <= total:
        raise ValueError(f"skip_mode='non-uniform': center={config.center} is outside the {total} steps of this call")
    full = set(quad_center_indices(total, count, config.center, config.pow))
    return tuple(p in full for p in positions)


# --- the cut in the UNet ----------------------------------------------------------------------------------------------
class CachePoint(NamedTuple):
    """Where a branch id cuts a UNet: down level `level` runs its first `layers` layers on shallow steps; the mirroring
    up block (`up_index` in forward order) runs its layers from `split` on, starting from the cached feature."""

    level: int
    layers: int
    up_index: int
    split: int


def cache_point(down_blocks: Any, branch_id: int) -> CachePoint:
    """The cut of DeepCache's `cache_branch_id` in a UNet with these down blocks; ValueError past its deepest level."""
    levels = len(down_blocks)
    if not 0 <= branch_id < LAYERS_PER_BRANCH_LEVEL * levels:
        raise ValueError(
            f"cache_branch_id={branch_id}: this UNet has {levels} levels, so branch ids 0..."
            f"{LAYERS_PER_BRANCH_LEVEL * levels - 1} (3 * level + layer)"
        )
    level, layer = divmod(branch_id, LAYERS_PER_BRANCH_LEVEL)
    n = len(down_blocks[level].resnets)
    layers = min(layer, n)  # a layer id past the level's resnets keeps all of them, as DeepCache's comparisons do
    # the up block has n + 1 resnets; the last `layers + 1` of them run on shallow steps
    return CachePoint(level, layers, levels - 1 - level, n - layers)


def shallow_residuals(down_blocks: Any, point: CachePoint) -> int | None:
    """How many ControlNet skip residuals (from the first) a shallow step reads: those of the layers it runs. None
    for a cut right below the mid block, whose shallow steps read the mid residual too (the whole ControlNet)."""
    if point.up_index == 0 and point.split == 0:
        return None
    above = sum(len(b.resnets) + (b.downsamplers is not None) for b in list(down_blocks)[: point.level])
    return 1 + above + point.layers


class DeepCacheStep(NamedTuple):
    """What one UNet call of a cached loop takes: the cut, and the cached feature (None: a full step, which
    computes every level and returns the feature for the shallow steps after it)."""

    point: CachePoint
    feature: torch.Tensor | None = None


class DeepCacheMixin:
    """Diffusers' cache API on the UNet: `enable_cache(DeepCacheConfig(...))`, `disable_cache()`,
    `is_cache_enabled`. The config is a setting of the model (as FreeU's factors); the cache itself is per call,
    held by the pipeline's loop, never on the model."""

    _deep_cache_config: DeepCacheConfig | None = None

    def enable_cache(self, config: DeepCacheConfig) -> None:
        if not isinstance(config, DeepCacheConfig):
            raise TypeError(f"enable_cache takes a rapiddiff.DeepCacheConfig, got {config!r}")
        cache_point(self.down_blocks, config.cache_branch_id)  # type: ignore[attr-defined]
        self._deep_cache_config = config

    def disable_cache(self) -> None:
        self._deep_cache_config = None

    @property
    def is_cache_enabled(self) -> bool:
        return self._deep_cache_config is not None

    @property
    def cache_config(self) -> DeepCacheConfig | None:
        return self._deep_cache_config


def cached_forward(
    unet: Any,
    sample: torch.Tensor,
    emb: torch.Tensor,
    attn_kwargs: dict[str, Any],
    down_residuals: tuple[torch.Tensor, ...] | None,
    mid_residual: torch.Tensor | None,
    step: DeepCacheStep,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet body (after the embeddings) of one cached step: (prediction, the feature for the next shallow steps).

    A full step runs every block and returns the feature entering the cut up block's layer `split`; a shallow step
    runs the blocks above the cut and starts that up block from `step.feature` (returned again as is). ControlNet
    residuals of the levels a shallow step does not run are not read."""
    point, feature = step
    shallow = feature is not None
    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    for k, block in enumerate(unet.down_blocks):
        if shallow and k == point.level:
            hidden, block_skips = block(hidden, emb, stop=point.layers, **attn_kwargs)
            skips += block_skips
            break
        hidden, block_skips = block(hidden, emb, **attn_kwargs)
        skips += block_skips
    if down_residuals is not None:  # zip stops at the skips this step computed
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
    # A cut right below the mid block caches the mid block's output, and the step's own ControlNet mid residual is
    # added to it (DeepCache's skipped mid block returns its cached output, then the UNet adds the residual).
    below_mid = point.up_index == 0 and point.split == 0
    if not shallow and unet.mid_block is not None:
        hidden = unet.mid_block(hidden, emb, **attn_kwargs)
    if not shallow and below_mid:
        feature = hidden
    if shallow and below_mid:
        hidden = feature
    if (not shallow or below_mid) and mid_residual is not None:
        hidden = hidden + mid_residual
    explicit_size = any(s % 2**unet.num_upsamplers for s in sample.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        if shallow and i < point.up_index:
            continue
        if shallow and i == point.up_index:
            # the skips of the layers that do not run are not computed: None in their places
            have = point.layers + 1
            block_skips, skips = skips[-have:] + (None,) * (n - have), skips[:-have]
            hidden = hidden if below_mid else feature
        else:
            block_skips, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if explicit_size and i < len(unet.up_blocks) - 1 else None
        if i != point.up_index:
            hidden = block(hidden, block_skips, emb, upsample_size=size, **attn_kwargs)
            continue
        if not shallow and not below_mid:
            hidden = block(hidden, block_skips, emb, stop=point.split, **attn_kwargs)
            feature = hidden
        hidden = block(hidden, block_skips, emb, upsample_size=size, start=point.split, **attn_kwargs)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
    assert feature is not None
    return out, feature
