"""transformers glue: ``load_offloaded_model()`` around ``from_pretrained``.

Inside ``with load_offloaded_model():`` a call such as
``AutoModelForCausalLM.from_pretrained(path, dtype=..., device_map="auto_offload",
max_memory=..., offload_folder=...)`` builds the model on the meta device from its
config and loads it with :func:`offload_dist.load.load_offloaded_checkpoint`, one rank
reading each byte and one owner holding it. ``device_map`` values this context does not
handle (none, a dict in a distributed job is refused, ``"cuda"``/``"cpu"`` in one
process) go to transformers unchanged.

The context replaces ``from_pretrained`` on transformers' ``PreTrainedModel`` and on the
``AutoModel*`` classes for its duration and restores them on
exit, exception or not; transformers offers no hook for this. Do not load models from
other threads while it is open.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch

from offload_dist.distributed.init import is_distributed, require_init
from offload_dist.load import DEVICE_MAPS, load_offloaded_checkpoint
from offload_dist.policy import OffloadPolicy

__all__ = ["load_offloaded_model", "build_empty_model"]

# from_pretrained options that do not change what is loaded from a local directory.
_IGNORED = ("adapter_kwargs", "_from_auto", "_commit_hash", "code_revision", "cache_dir", "local_files_only", "token",
            "force_download", "proxies", "use_safetensors", "low_cpu_mem_usage", "subfolder")


def _local_dir(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if os.path.isdir(p):
        return p
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(p, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - the message below says what to do
        raise FileNotFoundError(f"{p!r} is not a local checkpoint directory and could not be fetched ({e}); "
                                "download it first and pass the directory") from None


def build_empty_model(cls, config, dtype: torch.dtype | None):
    """The model of ``config`` with parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):  # Auto classes
            model = cls.from_config(config, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    # transformers ties embeddings while loading weights, not at construction: tie here,
    # or a tied lm_head.weight stays an untied meta tensor the checkpoint does not hold.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _resolve_dtype(dtype, config) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found)
        return found
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def _resolve_checkpoint(path, config, config_kwargs: dict):
    """The local checkpoint directory (None on ranks that cannot see it) and the config.

    In a distributed job only rank 0 needs the files: it reads ``config.json`` and sends
    it to the others as JSON (the others load their weights from rank 0 too), and a
    failure there fails every rank.
    """
    from transformers import AutoConfig

    if not is_distributed():
        local = _local_dir(path)
        return local, config or AutoConfig.from_pretrained(local, **config_kwargs)
    from offload_dist.distributed.collectives import broadcast_json
    from offload_dist.distributed.init import current_context
    from offload_dist.distributed.loader import LoadError

    rank = current_context().rank
    payload = None
    if rank == 0:
        try:
            local = _local_dir(path)
            cfg = config or AutoConfig.from_pretrained(local, **config_kwargs)
            payload = {"config": json.loads(cfg.to_json_string(use_diff=False))}
        except Exception as e:  # noqa: BLE001 - sent to every rank below
            payload = {"error": f"{type(e).__name__}: {e}"}
    payload = broadcast_json(payload, 0, tag="from_pretrained:config")
    if "error" in payload:
        raise LoadError(f"[rank {rank}] rank 0 could not read the checkpoint {os.fspath(path)!r}: {payload['error']}")
    if config is None:
        d = dict(payload["config"])
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    local = os.fspath(path) if os.path.isdir(os.fspath(path)) else None
    return local, config


@contextlib.contextmanager
def load_offloaded_model(*, mode: str = "auto", policy: OffloadPolicy | None = None) -> Iterator[None]:
    """Makes ``from_pretrained`` load with offload_dist (see the module docstring).

    Args:
        mode: distributed loading mode: ``"auto"``, ``"owner-reads"`` or ``"rank0"``.
        policy: pinning, copy and prefetch options of the loaded model.

    Raises:
        DistNotInitializedError: entered in a multi-rank launch before ``init_dist()``.
    """
    require_init("load_offloaded_model")
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class

    # Model classes inherit PreTrainedModel's from_pretrained; each AutoModel* class has
    # its own copy, which resolves the config before calling the model class: both kinds
    # are replaced for the duration of the context.
    autos, todo = [], list(_BaseAutoModelClass.__subclasses__())
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if "from_pretrained" in c.__dict__:
            autos.append(c)
    originals = {c: c.__dict__["from_pretrained"] for c in [PreTrainedModel, *autos]}

    def make(base):
        original = originals[base].__func__
        is_auto = base is not PreTrainedModel

        def from_pretrained(cls, path, *args, **kwargs):
            device_map = kwargs.get("device_map")
            ours = isinstance(device_map, str) and device_map in DEVICE_MAPS and (
                is_distributed() or device_map in ("auto", "auto_offload", "disk"))
            if not ours or args:
                return original(cls, path, *args, **kwargs)
            kwargs.pop("device_map")
            max_memory = kwargs.pop("max_memory", None)
            offload_folder = kwargs.pop("offload_folder", None)
            dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
            config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("trust_remote_code", "revision")}
            config = kwargs.pop("config", None)
            local, config = _resolve_checkpoint(path, config, config_kwargs)
            attn = kwargs.pop("attn_implementation", None)
            if attn is not None:
                config._attn_implementation = attn
            for k in _IGNORED:
                kwargs.pop(k, None)
            if kwargs:
                raise TypeError(f"from_pretrained options not supported with device_map={device_map!r} under "
                                f"load_offloaded_model: {sorted(kwargs)}")
            model_cls = _get_model_class(config, cls._model_mapping) if is_auto else cls
            model = build_empty_model(model_cls, config, _resolve_dtype(dtype, config))
            load_offloaded_checkpoint(model, local, device_map, max_memory=max_memory,
                                      offload_folder=offload_folder, mode=mode, policy=policy)
            return model

        return classmethod(from_pretrained)

    try:
        for base in originals:
            setattr(base, "from_pretrained", make(base))
        yield
    finally:
        for base, fn in originals.items():
            setattr(base, "from_pretrained", fn)
