"""offload_dist: distributed weight offloading for PyTorch models."""

from offload_dist.cache import OffloadError
from offload_dist.module import (disable_offloading, disable_onloading, get_execution_device, get_offloaded_device,
                                 is_offloaded, offload_model, offload_module, register_offload_module,
                                 remove_module_offload, set_onload_device, update_offload_parameter)
from offload_dist.policy import OffloadPolicy, Tier

__version__ = "0.1.0"
from offload_dist.dispatch import (DispatchError, dispatch_model, dispatch_with_map, get_device_map, plan_dispatch,
                                   remove_dispatch)
