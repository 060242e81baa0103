"""The disk tier: safetensors files, read with plain positional reads.

Two kinds of file back a disk segment:

* a checkpoint's own ``.safetensors`` files: tensors that come straight from a
  checkpoint are read where they are, never rewritten (``owned=False``);
* files this process writes to the offload folder: one file per packed segment, created
  0600 in a folder created 0700, written to a temporary name and renamed into place so
  no partial file ever carries a final name, and removed when no segment references
  them any more and at interpreter exit (``owned=True``).

Updates never modify a file in place: the new bytes go to a new file and the segment
that referenced the old one is dropped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_dist.log import annotate
from offload_dist.policy import Tier
from offload_dist.tensors import aligned_offsets
from offload_dist.tiers.base import Segment, TierStore
from offload_dist.tiers.staging import StagingPool

__all__ = ["CorruptFileError", "OffloadWriteError", "TensorInfo", "read_safetensors_header", "read_file_into",
           "DiskSegment", "DiskTier", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class CorruptFileError(ValueError):
    """A safetensors file is truncated or its header is malformed."""


class OffloadWriteError(OSError):
    """Writing an offload file failed (disk full, permissions); no partial file is left."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, with absolute byte offsets in the file."""

    path: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data in the file."""
        return self.end - self.start


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parses and validates a safetensors header without reading the tensor data.

    Checks that the header is well formed, every tensor's byte range matches its dtype
    and shape, and the file is long enough to hold all of them.

    Raises:
        CorruptFileError: the file is truncated or its header is invalid; the message
            names the file and the tensor.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CorruptFileError(f"{path}: header length {hlen} does not fit in a {size}-byte file "
                                   "(truncated or not a safetensors file)")
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is a {type(header).__name__}, expected an object")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            lo, hi = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed header entry {info!r} ({e!r})") from None
        if any(n < 0 for n in shape):
            raise CorruptFileError(f"{path}: tensor {name!r} has a negative dimension in shape {list(shape)}")
        numel = 1
        for n in shape:
            numel *= n
        if hi - lo != numel * dtype.itemsize or lo < 0:
            raise CorruptFileError(f"{path}: tensor {name!r} spans bytes [{lo}, {hi}) but {info['dtype']}{list(shape)} "
                                   f"needs {numel * dtype.itemsize}")
        if base + hi > size:
            raise CorruptFileError(f"{path}: tensor {name!r} ends at byte {base + hi} but the file has {size} bytes "
                                   "(truncated)")
        out[name] = TensorInfo(path, name, dtype, shape, base + lo, base + hi)
    return out


def read_file_into(path: str, offset: int, out: torch.Tensor) -> None:
    """Fills ``out`` with bytes ``[offset, offset + out.numel())`` of ``path`` (positional reads).

    Args:
        path: the file.
        offset: absolute byte offset in the file.
        out: 1D ``uint8`` contiguous CPU tensor (pinned or not).

    Raises:
        CorruptFileError: the file ends before the last byte wanted (truncated).
        OSError: the file cannot be opened or read.
    """
    view = memoryview(out.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptFileError(f"{path}: unexpected end of file at byte {offset + done} "
                                       f"(wanted {len(view)} bytes from {offset}); the file was truncated")
            done += n
    finally:
        os.close(fd)


class DiskSegment(Segment):
    """Bytes ``[offset, offset + nbytes)`` of a file."""

    tier = Tier.DISK

    def __init__(self, path: str, offset: int, nbytes: int, *, owned: bool):
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.owned = owned
        if owned:
            weakref.finalize(self, _unlink_quietly, path)

    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False,
             staging: StagingPool | None = None) -> torch.Tensor:
        """Reads the bytes: through ``staging`` to a GPU, else into new (pinned for a GPU)
        host memory.

        Raises:
            CorruptFileError: the file is shorter than the segment (truncated).
            OSError: the file cannot be read.
        """
        pin = device.type == "cuda"
        if pin and staging is not None:
            return staging.read_to_device(self._reader(start), end - start, device)
        with annotate("offload_dist::disk_read"):
            buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)
            read_file_into(self.path, self.offset + start, buf)
        if device.type == "cpu":
            return buf
        return buf.to(device, non_blocking=non_blocking and pin)

    def read_into(self, start: int, end: int, out: torch.Tensor, *, non_blocking: bool = False,
                  staging: StagingPool | None = None) -> None:
        """Reads the bytes into ``out``: through ``staging`` to a GPU, straight into a
        contiguous CPU ``out``, else as :meth:`Segment.read_into` does."""
        if out.device.type == "cuda" and staging is not None:
            staging.read_to_device(self._reader(start), end - start, out.device, out=out)
        elif out.device.type == "cpu" and out.is_contiguous():
            with annotate("offload_dist::disk_read"):
                read_file_into(self.path, self.offset + start, out)
        else:
            super().read_into(start, end, out, non_blocking=non_blocking, staging=staging)

    def _reader(self, start: int):
        """Reads bytes of this segment from ``start`` on: ``read(pos, buf)`` fills ``buf``."""
        path, base = self.path, self.offset + start

        def read(pos: int, buf: torch.Tensor) -> None:
            read_file_into(path, base + pos, buf)

        return read

    def raw(self) -> torch.Tensor:
        """A meta tensor of the segment's size: the bytes are in the file."""
        return torch.empty(self.nbytes, dtype=torch.uint8, device="meta")

    def advise(self, start: int, end: int) -> None:
        """Brings bytes ``[start, end)`` into the page cache ahead of their read (see
        [Note: read-ahead])."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # the read itself reports it
        try:
            _warm(fd, self.offset + start, self.offset + end)
        except OSError:
            pass  # a hint only: the read itself reports what is wrong
        finally:
            os.close(fd)


# [Note: read-ahead]
# A hint that bytes will be read soon is carried out by reading them: plain positional
# reads of WARM_CHUNK bytes into a scratch buffer, which the kernel turns into large
# requests and keeps in the page cache, so that the forward's own read finds them there.
# Several hint threads read at once (a disk's bandwidth often needs several requests in
# flight). Before each chunk two small reads with RWF_NOWAIT, of its first and its last
# page, ask whether it is cached already (a later pass over a model that fits in the page
# cache): then it is skipped and costs no copy. The last page matters: the kernel's own
# read-ahead after a read of the chunk's start caches its head, not its tail. Where the
# file system cannot answer RWF_NOWAIT, the hint falls back to posix_fadvise(WILLNEED).

WARM_CHUNK = 8 << 20
_PROBE = 4096


def _warm(fd: int, lo: int, hi: int) -> None:
    nowait = getattr(os, "RWF_NOWAIT", None)
    scratch = None
    pos = lo
    while pos < hi:
        n = min(WARM_CHUNK, hi - pos)
        if nowait is not None:
            probe = bytearray(min(n, _PROBE))
            try:
                if all(os.preadv(fd, [probe], at, nowait) == len(probe)
                       for at in dict.fromkeys((pos, pos + n - len(probe)))):
                    pos += n  # cached already
                    continue
            except BlockingIOError:
                pass  # not cached: read it below
            except OSError:
                nowait = None  # RWF_NOWAIT unsupported here
        if nowait is None:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, pos, hi - pos, os.POSIX_FADV_WILLNEED)
                return
        if scratch is None:
            scratch = bytearray(WARM_CHUNK)
        os.preadv(fd, [memoryview(scratch)[:n]], pos)
        pos += n


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty: files someone else still owns


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


class DiskTier(TierStore):
    """Writes segments as safetensors files in an offload folder.

    Args:
        folder: the offload folder; created 0700 if missing (and removed at exit if this
            process created it and left it empty).

    Raises:
        OffloadWriteError: the folder cannot be created or is not writable.
    """

    tier = Tier.DISK

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.path.abspath(os.fspath(folder))
        created = not os.path.isdir(self.folder)
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
        except OSError as e:
            raise OffloadWriteError(e.errno, f"cannot create offload folder {self.folder!r}: {e.strerror}") from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise OffloadWriteError(errno.EACCES, f"offload folder {self.folder!r} is not writable by this process; "
                                    "pass offload_folder= a directory you can write")
        if created:
            weakref.finalize(self, _rmdir_quietly, self.folder)
            # Folders outlive tier objects that are collected early; still clean at exit.
            import atexit
            atexit.register(_rmdir_quietly, self.folder)

    def allocate(self, nbytes: int, label: str) -> Segment:
        """Not supported: disk segments are written whole with :meth:`put`."""
        raise NotImplementedError("disk segments are written whole with put()")

    def put(self, storages: list[torch.Tensor], label: str) -> tuple[DiskSegment, list[int]]:
        """Writes ``storages`` packed into one new safetensors file (0600, written to a
        temporary name, then renamed into place).

        Args:
            storages: 1D ``uint8`` byte runs, on any device but meta.
            label: names the file and the error.

        Returns:
            ``(segment, offsets)``: where each storage starts in the segment.

        Raises:
            OffloadWriteError: the write failed (disk full, permissions); no file is left.
        """

        offsets, total = aligned_offsets(s.numel() for s in storages)
        header = json.dumps({"data": {"dtype": "U8", "shape": [total], "data_offsets": [0, total]}}).encode()
        header += b" " * (-len(header) % 8)
        name = f"{_SAFE.sub('_', label)[-80:]}-{uuid.uuid4().hex[:12]}.safetensors"
        final = os.path.join(self.folder, name)
        tmp = final + ".tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            _write_all(fd, memoryview(struct.pack("<Q", len(header)) + header))
            pos = 0
            for s, off in zip(storages, offsets):
                if off > pos:
                    _write_all(fd, memoryview(bytes(off - pos)))
                cpu = s.detach().to("cpu").contiguous()
                _write_all(fd, memoryview(cpu.numpy()).cast("B"))
                pos = off + s.numel()
            os.close(fd)
            fd = -1
            os.rename(tmp, final)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)
            raise OffloadWriteError(e.errno, f"writing offload file for {label} in {self.folder!r} failed: "
                                    f"{e.strerror or e}; nothing was written") from None
        return DiskSegment(final, 8 + len(header), total, owned=True), offsets


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The ``.safetensors`` files of a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}")
    return files
