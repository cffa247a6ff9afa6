"""fusion_kernels and mergekit, in one place.

- :mod:`.method`: the ``neuron_fusion`` merge method, registered in mergekit's registry;
- :mod:`.sparsify`: mergekit's sparsification computed by the fused op, and :func:`install`;
- :mod:`.launcher` (``python -m fusion_kernels.mergekit CONFIG.yml OUT``): mergekit's own
  ``mergekit-yaml`` with both installed;
- :mod:`.config`: a mergekit YAML file read as a merge of ours (``merge --config``), without
  mergekit.

Importing any of these never needs mergekit; installing into it does.
"""

from .config import MergeConfigFile, load_merge_config, parse_merge_config
from .launcher import main
from .method import (
    METHOD_NAME,
    METHOD_PARAMETERS,
    MergekitMissingError,
    neuron_fusion_method,
    neuron_rules_from_text,
    register_method,
)
from .sparsify import accelerated_sparsify, install, is_accelerated, uninstall

__all__ = [
    "METHOD_NAME",
    "METHOD_PARAMETERS",
    "MergeConfigFile",
    "MergekitMissingError",
    "accelerated_sparsify",
    "install",
    "is_accelerated",
    "load_merge_config",
    "main",
    "neuron_fusion_method",
    "neuron_rules_from_text",
    "parse_merge_config",
    "register_method",
    "uninstall",
]
