"""attnzoo: a zoo of long-context attention methods with pluggable selectors.

*What* a head computes is a plan (``attnzoo.plans``) written by a selector; *how* it is computed
is an op (``attnzoo.ops``) whose backend is chosen by capability (``attnzoo.ops.dispatch``).
"""

from . import ops, plans, settings
from .caches import clear_caches
from .config import ConfigError, dump_config, load_config
from .integrations.hf_patch import patch
from .plans import BlockPlan, DensePlan, HeadPlan, TokenPlan
from .registry import available, create, register, to_config
from .stack import LayerStack, build

__version__ = "0.1.0"

__all__ = ["ops", "plans", "BlockPlan", "DensePlan", "HeadPlan", "TokenPlan", "register",
           "create", "available", "to_config", "load_config", "dump_config", "ConfigError",
           "build", "patch", "LayerStack", "settings", "clear_caches", "__version__"]
