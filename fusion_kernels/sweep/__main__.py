"""``python -m fusion_kernels.sweep``: see :mod:`.cli`."""

from .cli import cli

cli()
