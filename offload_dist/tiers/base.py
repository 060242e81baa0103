"""The interface every tier implements."""

from __future__ import annotations

from typing import TYPE_CHECKING

import abc

import torch

if TYPE_CHECKING:
    from offload_dist.tiers.staging import StagingPool

from offload_dist.policy import Tier
from offload_dist.tensors import aligned_offsets


class Segment(abc.ABC):
    """A contiguous run of ``nbytes`` bytes held by one tier."""

    tier: Tier
    nbytes: int

    @abc.abstractmethod
    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False,
             staging: StagingPool | None = None) -> torch.Tensor:
        """Bytes ``[start, end)`` as a 1D ``uint8`` tensor on ``device``.

        When the bytes already live on ``device`` this is a view (no copy); writes to a
        view land in the segment. ``staging``: reusable pinned buffers for tiers that
        read through host memory (disk) on their way to a GPU.
        """

    def read_into(self, start: int, end: int, out: torch.Tensor, *, non_blocking: bool = False,
                  staging: StagingPool | None = None) -> None:
        """Bytes ``[start, end)`` copied into ``out`` (1D ``uint8``, ``end - start`` long, on
        any device); asynchronous on the current stream where :meth:`read` would be."""
        out.copy_(self.read(start, end, out.device, non_blocking=non_blocking, staging=staging),
                  non_blocking=non_blocking)

    @abc.abstractmethod
    def raw(self) -> torch.Tensor:
        """The bytes at rest: a CPU or device tensor, or a meta tensor for disk."""

    def quiesce(self) -> None:
        """Waits until no asynchronous copy still reads these bytes (before a host write)."""

    def advise(self, start: int, end: int) -> None:
        """Hints that bytes ``[start, end)`` will be read soon (disk: start reading them
        into the page cache). A no-op where reads are cheap."""

    def write(self, start: int, data: torch.Tensor) -> None:
        """Overwrites bytes in place. Tiers that cannot (disk) raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be written in place")


class TierStore(abc.ABC):
    """Creates segments of one tier."""

    tier: Tier

    @abc.abstractmethod
    def allocate(self, nbytes: int, label: str) -> Segment:
        """An uninitialised writable segment (cpu and device tiers)."""

    def put(self, storages: list[torch.Tensor], label: str) -> tuple[Segment, list[int]]:
        """Packs ``storages`` (1D ``uint8``) into one new segment.

        Args:
            storages: byte runs to pack, on any device but meta.
            label: the module (and tensor) they belong to, for error messages and
                file names.

        Returns:
            ``(segment, offsets)``: where each storage starts in the segment.
        """
        offsets, total = aligned_offsets(s.numel() for s in storages)
        seg = self.allocate(total, label)
        for s, off in zip(storages, offsets):
            seg.write(off, s)
        return seg, offsets
