"""The cpu tier: host memory, pinned when CUDA is present."""

from __future__ import annotations

import torch

from offload_dist.log import get_logger
from offload_dist.policy import OffloadPolicy, Tier
from offload_dist.tiers.base import Segment, TierStore

_log = get_logger()


class CpuSegment(Segment):
    tier = Tier.CPU

    def __init__(self, data: torch.Tensor):
        self.data = data  # 1D uint8, CPU, pinned when the policy asks and pinning works
        self.nbytes = data.numel()
        self.pinned = data.is_pinned() if torch.cuda.is_available() else False

    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
        view = self.data[start:end]
        if device.type == "cpu":
            return view
        with torch.profiler.record_function("offload_dist::h2d"):
            return view.to(device, non_blocking=non_blocking and self.pinned)

    def raw(self) -> torch.Tensor:
        return self.data

    def write(self, start: int, data: torch.Tensor) -> None:
        self.data[start:start + data.numel()].copy_(data.reshape(-1).view(torch.uint8))


class CpuTier(TierStore):
    """Allocates cpu-tier segments according to an :class:`OffloadPolicy`."""

    tier = Tier.CPU

    def __init__(self, policy: OffloadPolicy | None = None):
        self.policy = policy or OffloadPolicy()
        self._pin = self.policy.should_pin()

    def allocate(self, nbytes: int, label: str) -> CpuSegment:
        if self._pin:
            try:
                return CpuSegment(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
            except RuntimeError as e:
                # Pinning is an optimisation: the bytes are the same, copies are slower.
                _log.warning("pinning %d bytes for %s failed (%s); using pageable memory for the cpu tier "
                             "from now on (check `ulimit -l`)", nbytes, label, e)
                self._pin = False
        return CpuSegment(torch.empty(nbytes, dtype=torch.uint8))
