"""Small helpers shared by schedulers and pipelines."""

from .torch_utils import randn_tensor, to_device

__all__ = ["randn_tensor", "to_device"]
