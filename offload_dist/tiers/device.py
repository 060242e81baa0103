"""The device tier: the tensors stay on a GPU (or CPU) and are never moved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from offload_dist.tiers.staging import StagingPool

from offload_dist.policy import Tier
from offload_dist.tiers.base import Segment, TierStore


class DeviceSegment(Segment):
    """Bytes that stay on a device: a 1D ``uint8`` tensor there."""

    tier = Tier.DEVICE

    def __init__(self, data: torch.Tensor):
        self.data = data  # 1D uint8 on the tier's device
        self.nbytes = data.numel()

    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False,
             staging: StagingPool | None = None) -> torch.Tensor:
        """A view on the segment's own device, else a copy."""
        view = self.data[start:end]
        return view if view.device == device else view.to(device, non_blocking=non_blocking)

    def raw(self) -> torch.Tensor:
        """The bytes themselves."""
        return self.data

    def write(self, start: int, data: torch.Tensor) -> None:
        """Copies ``data``'s bytes in at ``start``."""
        self.data[start:start + data.numel()].copy_(data.reshape(-1).view(torch.uint8))


class DeviceTier(TierStore):
    """Allocates segments on ``device``: tensors that rest where they run."""

    tier = Tier.DEVICE

    def __init__(self, device: torch.device):
        self.device = device

    def allocate(self, nbytes: int, label: str) -> DeviceSegment:
        """An uninitialised segment on the tier's device."""
        return DeviceSegment(torch.empty(nbytes, dtype=torch.uint8, device=self.device))
