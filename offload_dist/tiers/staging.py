"""Pinned host buffers through which bytes read from a file reach a GPU.

A leaf of :mod:`offload_dist.tiers`: the tier interface (:mod:`~offload_dist.tiers.base`)
names it as the ``staging`` argument of a read, and the disk tier uses it; it knows
nothing of files or tiers (the caller hands it a function that reads).
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import torch

from offload_dist.log import annotate

__all__ = ["StagingPool"]


class StagingPool:
    """Reusable pinned host buffers through which disk reads reach a GPU.

    A read is cut into chunks; each chunk is read into a free buffer and copied to the
    device asynchronously on the current stream, and the buffer is reused once the event
    recorded after its copy has completed. So reads never allocate pinned memory (which
    costs as much as the read itself) and a reader thread keeps the disk busy while the
    previous chunk crosses PCIe. Thread-safe: several reader threads share one pool.

    Args:
        chunk: bytes per buffer.
        count: number of buffers (pinned memory = ``chunk * count``, allocated on first use).
    """

    def __init__(self, chunk: int = 32 << 20, count: int = 8):
        self.chunk = chunk
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put((None, None))

    def _acquire(self) -> torch.Tensor:
        buf, event = self._free.get()
        if event is not None:
            event.synchronize()
        if buf is None:
            buf = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
        return buf

    def read_to_device(self, read: Callable[[int, torch.Tensor], None], nbytes: int, device: torch.device, *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Reads ``nbytes`` bytes of a source through the pool onto ``device``.

        Args:
            read: ``read(pos, buf)`` fills the pinned CPU ``buf`` (1D ``uint8``) with the
                source's bytes ``[pos, pos + buf.numel())``; it is called from this
                thread, once per chunk.
            nbytes: bytes to read, from position 0 of the source.
            device: the CUDA device the bytes go to.
            out: a 1D ``uint8`` tensor of ``nbytes`` on ``device`` to fill; a new one when None.

        Returns:
            ``out``, or the new tensor; filled asynchronously on the current stream.
        """
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device)
        with annotate("offload_dist::disk_read"):
            for pos in range(0, nbytes, self.chunk):
                n = min(self.chunk, nbytes - pos)
                buf = self._acquire()
                try:
                    read(pos, buf[:n])
                    out[pos:pos + n].copy_(buf[:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                except BaseException:
                    self._free.put((buf, None))
                    raise
                self._free.put((buf, event))
        return out
