"""The cpu tier: host memory, pinned when CUDA is present.

[Note: pinning]
Two ways to pin, chosen by ``OffloadPolicy.pin_method``:

* ``"register"`` (default): allocate ordinary host memory of exactly the segment's
  size and pin it in place with ``cudaHostRegister``. No rounding, so host memory for
  the offloaded weights stays at their size. The registration is dropped when the
  segment is collected, after a device synchronisation, so no copy that is still in
  flight reads unpinned memory; views handed out earlier stay valid (pageable).
* ``"alloc"``: ``torch.empty(..., pin_memory=True)``: PyTorch's caching host allocator,
  which rounds each allocation up to a power of two and keeps freed blocks cached.

If pinning fails (``ulimit -l``, no driver), the tier says so once and continues with
pageable memory: the bytes are the same, copies are slower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import weakref

import torch

if TYPE_CHECKING:
    from offload_dist.tiers.staging import StagingPool

from offload_dist.log import annotate, get_logger
from offload_dist.policy import OffloadPolicy, Tier
from offload_dist.tiers.base import Segment, TierStore

_log = get_logger()


class CpuSegment(Segment):
    """Bytes in host memory (pinned or pageable): a 1D ``uint8`` CPU tensor.

    Args:
        data: the bytes.
        pinned: whether ``data`` is page-locked (then copies to a GPU may be asynchronous).
    """

    tier = Tier.CPU

    def __init__(self, data: torch.Tensor, pinned: bool = False):
        self.data = data  # 1D uint8, CPU; pinned (page-locked) when ``pinned``
        self.nbytes = data.numel()
        self.pinned = pinned
        # CUDA devices that asynchronous copies read these bytes to (a set shared with the
        # unpinning finalizer): a host write or an unpin waits for them.
        self.read_on: set[int] = set()

    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False,
             staging: StagingPool | None = None) -> torch.Tensor:
        """A view on cpu; else a copy, asynchronous when pinned and ``non_blocking``."""
        view = self.data[start:end]
        if device.type == "cpu":
            return view
        asynchronous = non_blocking and self.pinned
        if asynchronous and device.type == "cuda":
            self.read_on.add(device.index if device.index is not None else torch.cuda.current_device())
        with annotate("offload_dist::h2d"):
            return view.to(device, non_blocking=asynchronous)

    def read_into(self, start: int, end: int, out: torch.Tensor, *, non_blocking: bool = False,
                  staging: StagingPool | None = None) -> None:
        """Copies into ``out``, asynchronously when pinned, ``non_blocking`` and on CUDA."""
        asynchronous = non_blocking and self.pinned and out.device.type == "cuda"
        if asynchronous:
            self.read_on.add(out.device.index if out.device.index is not None else torch.cuda.current_device())
        with annotate("offload_dist::h2d"):
            out.copy_(self.data[start:end], non_blocking=asynchronous)

    def quiesce(self) -> None:
        """Waits for the devices that asynchronous copies of these bytes were issued to."""
        _wait_for_devices(self.read_on)

    def raw(self) -> torch.Tensor:
        """The bytes themselves (writes to it land in the segment)."""
        return self.data

    def write(self, start: int, data: torch.Tensor) -> None:
        """Copies ``data``'s bytes in at ``start`` (call :meth:`quiesce` first)."""
        self.data[start:start + data.numel()].copy_(data.reshape(-1).view(torch.uint8))


def _wait_for_devices(devices: set[int]) -> None:
    """Waits for the work queued on each CUDA device in ``devices`` (copies reading host bytes)."""
    for d in sorted(devices):
        torch.cuda.synchronize(d)


def _unregister(ptr: int, read_on: set[int]) -> None:
    try:
        _wait_for_devices(read_on)  # no copy may still read the pages being unpinned
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already
        pass


def _memlock_limit() -> str:
    """This process's locked-memory limit (``ulimit -l``), as the warning prints it."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


class CpuTier(TierStore):
    """Allocates cpu-tier segments according to an :class:`OffloadPolicy` (see [Note: pinning])."""

    tier = Tier.CPU

    def __init__(self, policy: OffloadPolicy | None = None):
        self.policy = policy or OffloadPolicy()
        self._pin = self.policy.should_pin()

    def allocate(self, nbytes: int, label: str) -> CpuSegment:
        """A new segment, pinned as the policy says (pageable when pinning fails)."""
        if self._pin and nbytes > 0:
            try:
                if self.policy.pin_method == "alloc":
                    return CpuSegment(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), pinned=True)
                data = torch.empty(nbytes, dtype=torch.uint8)
                ptr = data.data_ptr()
                err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister returned {err}")
                seg = CpuSegment(data, pinned=True)
                weakref.finalize(seg, _unregister, ptr, seg.read_on)
                return seg
            except (RuntimeError, AssertionError) as e:  # no driver, memlock limit, CPU-only build
                # Pinning is an optimisation: the bytes are the same, copies are slower.
                _log.warning("pinning %d bytes for %s failed (%s); using pageable memory for the cpu tier "
                             "from now on (check `ulimit -l`, here %s)", nbytes, label, e, _memlock_limit())
                self._pin = False
        return CpuSegment(torch.empty(nbytes, dtype=torch.uint8))
