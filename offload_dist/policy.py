"""Frozen options and enums shared by every layer.

Nothing here holds runtime state: these are values that are passed around.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Tier", "OffloadPolicy", "parse_device", "parse_tier", "DISK"]

DISK = "disk"


class Tier(enum.Enum):
    """Where a tensor lives at rest (its *offload tier*).

    DEVICE: the tensor stays on its onload device; costs device memory, no transfers.
    CPU: host memory (pinned when CUDA is present); costs host memory, one H2D copy
        per onload.
    DISK: safetensors files (the checkpoint's own or the offload folder's); costs disk
        space and a read per onload, no resident memory.
    """

    DEVICE = "device"
    CPU = "cpu"
    DISK = "disk"


WINDOW_MAX_GIB = 4  # the default prefetch window grows by 1 GiB per rank up to this


@dataclass(frozen=True)
class OffloadPolicy:
    """How the cpu tier allocates and copies.

    Attributes:
        pin_memory: pin host buffers of the cpu tier. ``None`` means pin when CUDA is
            available (pinning without a GPU gains nothing).
        non_blocking: issue host->device copies asynchronously from pinned memory.
        prefetch_depth: at most this many modules ahead of the running one are being
            onloaded (see [Note: stream ordering]); 0 onloads each module when it starts.
        prefetch_bytes: and at most this many bytes ahead (the device memory the
            prefetched modules may take); the next module is always allowed. ``None``
            (default) means 1 GiB for every rank that copies from its host, up to
            ``WINDOW_MAX_GIB``: 1 GiB in one process, ``min(world_size, 4)`` GiB in a
            distributed job, where each rank copies only the modules it owns and the
            window must hold enough of every owner's modules to keep the host->device
            links busy (see :meth:`window_bytes`). With this default, in a distributed
            job the window may grow by half again while an owner holds less than its
            share of it (:meth:`window_limit`); a number set here is a hard bound.
            Every rank receives every module, so that is the prefetched weights on
            every GPU.
        pin_method: ``"register"`` pins exact-size allocations in place
            (``cudaHostRegister``); ``"alloc"`` uses PyTorch's pinned caching allocator
            (see [Note: pinning]).
        disk_readers: threads that read prefetched disk-tier modules (in the order they
            are predicted to run).
        disk_read_ahead: read the disk modules predicted past the prefetch window into
            the page cache ahead of time, on ``disk_readers`` threads of their own
            (chunks already cached are skipped); before the order is learnt, the modules
            registered after the running one.
        block_transfers: in jobs loaded by the distributed loader, the modules of each
            repeated block (a decoder layer: an element of the model's list of layers)
            get one owner and travel to every rank in one collective, with one prefetch
            step for the block (see [Note: transfer groups] in
            :mod:`offload_dist.distributed.groups`); blocks too large for that to keep the
            owners balanced, and blocks holding a list of experts, stay per module.
    """

    pin_memory: bool | None = None
    non_blocking: bool = True
    prefetch_depth: int = 32
    prefetch_bytes: int | None = None
    pin_method: str = "register"
    disk_readers: int = 4
    disk_read_ahead: bool = True
    block_transfers: bool = True

    def __post_init__(self) -> None:
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.prefetch_bytes is not None and self.prefetch_bytes < 0:
            raise ValueError(f"prefetch_bytes must be >= 0, got {self.prefetch_bytes}")
        if self.disk_readers < 1:
            raise ValueError(f"disk_readers must be >= 1, got {self.disk_readers}")
        if self.pin_method not in ("register", "alloc"):
            raise ValueError(f"pin_method must be 'register' or 'alloc', got {self.pin_method!r}")

    def window_bytes(self, world_size: int = 1) -> int:
        """The prefetch window in bytes for a job of ``world_size`` ranks."""
        if self.prefetch_bytes is not None:
            return self.prefetch_bytes
        return min(max(1, world_size), WINDOW_MAX_GIB) << 30

    def window_limit(self, world_size: int = 1) -> int:
        """The most bytes the window may hold: :meth:`window_bytes`, and with the default
        ``prefetch_bytes`` in a distributed job half as much again while an owner holds
        less than its share (see [Note: owner shares] in :mod:`offload_dist.prefetch`)."""
        window = self.window_bytes(world_size)
        if world_size <= 1 or self.prefetch_bytes is not None:
            return window  # an explicit bound is kept
        return window + window // 2

    def should_pin(self) -> bool:
        if self.pin_memory is None:
            return torch.cuda.is_available()
        return self.pin_memory


def parse_device(device: torch.device | str | int) -> torch.device:
    """Turns a user's device spec into a ``torch.device`` with an explicit index for CUDA.

    Raises:
        ValueError: the string names no device torch knows, or it is ``"disk"``
            (disk is an offload tier, never an onload device).
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, int):
        dev = torch.device("cuda", device)
    elif isinstance(device, str):
        if device == DISK:
            raise ValueError("'disk' is an offload tier, not an onload device; "
                             "pass 'cpu' or a GPU such as 'cuda:0'")
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' "
                             f"or an int GPU index ({e})") from None
    else:
        raise TypeError(f"device must be a torch.device, str or int, got {type(device).__name__}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def parse_tier(offload_device: torch.device | str | int,
               onload_device: torch.device) -> tuple[Tier, torch.device | None]:
    """Maps a compressed-tensors style ``offload_device`` to a tier.

    Returns:
        ``(tier, device)``: ``device`` is the device of the DEVICE tier, ``None`` otherwise.

    Raises:
        ValueError: an unknown device string.
    """
    if isinstance(offload_device, str) and offload_device == DISK:
        return Tier.DISK, None
    if isinstance(offload_device, Tier):
        return offload_device, (onload_device if offload_device is Tier.DEVICE else None)
    dev = parse_device(offload_device)
    if dev.type == "cpu":
        return Tier.CPU, None
    return Tier.DEVICE, dev
