"""Offload tiers: where bytes live at rest, behind one small interface.

A tier stores *segments*: contiguous runs of bytes (one per module in the common case,
every storage of the module packed at 64-byte offsets). A segment can hand back any
byte range on any device; the layouts of :mod:`offload_dist.tensors` turn those bytes
back into tensors.
"""

from offload_dist.tiers.base import Segment, TierStore
from offload_dist.tiers.cpu import CpuSegment, CpuTier
from offload_dist.tiers.device import DeviceSegment, DeviceTier
from offload_dist.tiers.disk import (CorruptFileError, DiskSegment, DiskTier, OffloadWriteError, TensorInfo,
                                     read_safetensors_header)
from offload_dist.tiers.staging import StagingPool

__all__ = [
    "Segment", "TierStore", "CpuSegment", "CpuTier", "DeviceSegment", "DeviceTier", "DiskSegment", "DiskTier",
    "CorruptFileError", "OffloadWriteError", "TensorInfo", "read_safetensors_header",
    "StagingPool",
]
