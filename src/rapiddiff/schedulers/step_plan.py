"""One scheduler step split for a compiled whole step: `StepPlan` (prepared on the host), `PlanUpdate` (what the
update computes), and the `SchedulerOutput` an eager `step` returns (see scheduling_utils' module docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from ..utils.outputs import BaseOutput
from ..utils.torch_utils import to_device


# --- output --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SchedulerOutput(BaseOutput):
    """What `step` returns: the sample at the previous timestep and, where Diffusers gives it, the predicted x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


C = TypeVar("C", bound=tuple)


@dataclasses.dataclass
class StepPlan(Generic[C]):
    """One step prepared on the host. `apply_plan` reads the tensors and `options`, never `index`.

    `coeffs` is the scheduler's own NamedTuple of per-step numbers (0-dim float32 tensors, see `make_coeffs`): `_plan`
    builds it and `apply_plan` reads it by name.
    """

    index: int  # position in the schedule
    coeffs: C  # per-step numbers: on the CPU, or on the sample's device in a compiled step
    noise: torch.Tensor | None = None  # this step's fresh noise (None: the call draws none on any step)
    history: tuple[torch.Tensor, ...] = ()  # earlier outputs the update reads; a fixed count for a whole loop
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the call's constant options
    # The model sees `sample * model_input_scale` at this step (None: the sample as is); what `scale_model_input`
    # computes eagerly, as a tensor a compiled step takes as an input.
    model_input_scale: torch.Tensor | None = None

    def to(self, device: torch.device) -> StepPlan[C]:
        """The plan with its numbers on `device`, moved in one copy (noise and history are on the device already)."""
        values = [*self.coeffs, *([] if self.model_input_scale is None else [self.model_input_scale])]
        moved = to_device(torch.stack(values), device).unbind()
        scale = None if self.model_input_scale is None else moved[-1]
        return dataclasses.replace(self, coeffs=type(self.coeffs)(*moved[: len(self.coeffs)]), model_input_scale=scale)

    def scale_model_input(self, sample: torch.Tensor) -> torch.Tensor:
        """The model input at this step (see `model_input_scale`)."""
        return sample if self.model_input_scale is None else sample * self.model_input_scale


class PlanUpdate(NamedTuple):
    """What `apply_plan` computes: the sample at the previous timestep, the predicted x0 where the scheduler gives it,
    and the tensors `commit_plan` keeps for later steps (history)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None
    stored: tuple[torch.Tensor, ...]


def make_coeffs(cls: type[C], **values: torch.Tensor | float) -> C:
    """A scheduler's per-step NamedTuple `cls` from numbers and 0-dim tensors, each as a 0-dim float32 tensor."""
    return cls(**{name: torch.as_tensor(v, dtype=torch.float32) for name, v in values.items()})


def owned(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it shares memory with `source` (a model output, overwritten by the next call when
    the model runs as a CUDA graph) so that it can be kept across steps."""
    if tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return tensor.clone()
    return tensor
