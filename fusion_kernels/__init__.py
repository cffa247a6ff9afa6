"""fusion_kernels: merge a fine-tuned LLM back with its base (Locate-then-Merge, Neuron-Fusion).

Public API:
    merge_tensor(base, tuned, name="", **params) -> (merged, stats)   one tensor (see SPEC.md)
    merge_checkpoints(base_dir, tuned_dir, out_dir, params, ...) -> report   a whole checkpoint
    MergeParams, params_for(method, **overrides), PRESETS                     parameters
"""

from .errors import FusionError
from .neurons import NeuronRule, NeuronRules
from .ops import TensorStats, available_backends, merge_tensor
from .params import PRESETS, MergeParams, params_for
from .pipeline import merge_checkpoints, plan_merge
from .version import __version__

__all__ = [
    "PRESETS",
    "FusionError",
    "MergeParams",
    "NeuronRule",
    "NeuronRules",
    "TensorStats",
    "__version__",
    "available_backends",
    "merge_checkpoints",
    "merge_tensor",
    "params_for",
    "plan_merge",
]
