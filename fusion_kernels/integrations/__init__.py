"""Integrations with other merge tools.

:mod:`fusion_kernels.integrations.mergekit` registers the ``neuron_fusion`` merge method in
mergekit and can route mergekit's sparsification through the fused op. Importing it never needs
mergekit; using it does.
"""
