"""The package logger: one ``logging`` tree under ``"offload_dist"``, rank in every line.

Every record logged through :func:`get_logger` is prefixed ``[rank N] ``, where N is the
rank of the initialised default process group, else ``RANK`` (torchrun), else
``SLURM_PROCID`` (srun), else 0. Handlers, levels and formats stay the application's
choice; nothing here patches ``print`` or silences ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

PACKAGE_LOGGER = "offload_dist"


def _current_rank() -> int:
    """The rank to print; never raises (it runs inside logging)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return 0


class RankFilter(logging.Filter):
    """Prefixes ``[rank N] `` to each record's message and sets ``record.rank``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank"):
            record.rank = _current_rank()
            record.msg = f"[rank {record.rank}] {record.msg}"
        return True


def get_logger(name: str | None = None) -> logging.Logger:
    """Returns the package logger, or its child ``offload_dist.<name>``, with a RankFilter.

    Logger filters only see records logged on that very logger, so each logger handed
    out here gets its own filter (once).

    Args:
        name: Optional child name, e.g. ``"distributed.init"``; a leading ``"offload_dist."``
            is accepted and not doubled.

    Returns:
        The logger.
    """
    full = PACKAGE_LOGGER
    if name:
        full = name if name.startswith(PACKAGE_LOGGER + ".") else f"{PACKAGE_LOGGER}.{name}"
    logger = logging.getLogger(full)
    if not any(isinstance(f, RankFilter) for f in logger.filters):
        logger.addFilter(RankFilter())
    return logger


_NO_ANNOTATION = contextlib.nullcontext()


def annotate(name: str):
    """A ``torch.profiler`` range named ``name`` while a profiler runs; otherwise a no-op
    (a range costs microseconds on the hot path even when nothing records it)."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _NO_ANNOTATION
