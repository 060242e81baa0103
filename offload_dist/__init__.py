"""offload_dist: distributed weight offloading for PyTorch models.

Public names only; see docs/api.md.
"""

from offload_dist.cache import OffloadError
from offload_dist.dispatch import Placement
from offload_dist.distributed.collectives import CollectiveError, CollectiveOrderError
from offload_dist.tiers.disk import CorruptFileError, OffloadWriteError
from offload_dist.checkpoint import Checkpoint, CheckpointMismatchError, load_checkpoint_offloaded
from offload_dist.dispatch import (DispatchError, dispatch_model, dispatch_with_map, get_device_map, plan_dispatch,
                                   remove_dispatch)
from offload_dist.distributed.cache import NotOwnerError, WriteConflictError
from offload_dist.distributed.collectives import all_reduce, barrier
from offload_dist.distributed.init import (DistContext, DistNotInitializedError, current_context, init_dist,
                                           is_distributed, is_source_process)
from offload_dist.distributed.loader import LoadError, LoadReport, load_distributed
from offload_dist.distributed.parallel import ReplaceError, is_owner, replace_module_parallel, replicate_to_device
from offload_dist.distributed.plan import (NodeSpec, Plan, PlanError, PlanPolicy, RankSpec, Topology, Unit, make_plan,
                                           units_from_module)
from offload_dist.distributed.save import SaveError, save_parallel
from offload_dist.hf import load_offloaded_model
from offload_dist.load import load_offloaded_checkpoint
from offload_dist.module import (disable_offloading, disable_onloading, get_execution_device, get_offloaded_device,
                                 is_offloaded, offload_model, offload_module, register_offload_module,
                                 remove_module_offload, set_onload_device, update_offload_parameter)
from offload_dist.policy import OffloadPolicy, Tier

__version__ = "0.1.0"

__all__ = [
    "CollectiveError", "CollectiveOrderError", "CorruptFileError", "DistNotInitializedError", "LoadReport", "NodeSpec",
    "OffloadWriteError", "Placement", "RankSpec", "Topology", "Unit", "WriteConflictError", "units_from_module",
    "Checkpoint", "CheckpointMismatchError", "DispatchError", "DistContext", "LoadError", "NotOwnerError",
    "OffloadError", "OffloadPolicy", "Plan", "PlanError", "PlanPolicy", "ReplaceError", "SaveError", "Tier",
    "all_reduce", "barrier", "current_context", "disable_offloading", "disable_onloading", "dispatch_model",
    "dispatch_with_map", "get_device_map", "get_execution_device", "get_offloaded_device", "init_dist",
    "is_distributed", "is_offloaded", "is_owner", "is_source_process", "load_checkpoint_offloaded",
    "load_distributed", "load_offloaded_checkpoint", "load_offloaded_model", "make_plan", "offload_model",
    "offload_module", "plan_dispatch", "register_offload_module", "remove_dispatch", "remove_module_offload",
    "replace_module_parallel", "replicate_to_device", "save_parallel", "set_onload_device",
    "update_offload_parameter",
]
