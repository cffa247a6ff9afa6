"""fusion_kernels: merge a fine-tuned LLM back with its base (Locate-then-Merge, Neuron-Fusion).

Public API:
    merge_tensor(base, tuned, name="", **params) -> (merged, stats)   one tensor (see SPEC.md)
    merge_tensors(base, [tuned...], name="", params=..., combine=...)  one tensor, N tuned models
    merge_checkpoints(base_dir, tuned_dir, out_dir, params, ...) -> report   a whole checkpoint
    MergeParams, params_for(method, **overrides), PRESETS                     parameters
"""

from .errors import FusionError
from .neurons import NeuronRule, NeuronRules
from .ops import MultiTensorStats, TensorStats, available_backends, merge_tensor, merge_tensors
from .params import PRESETS, Combine, MergeParams, combine_for, params_for
from .pipeline import merge_checkpoints, plan_merge
from .version import __version__

__all__ = [
    "PRESETS",
    "Combine",
    "FusionError",
    "MergeParams",
    "MultiTensorStats",
    "NeuronRule",
    "NeuronRules",
    "TensorStats",
    "__version__",
    "available_backends",
    "combine_for",
    "merge_checkpoints",
    "merge_tensor",
    "merge_tensors",
    "params_for",
    "plan_merge",
]
