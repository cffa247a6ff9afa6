"""``python -m fusion_kernels.mergekit CONFIG.yml OUT [...]``: see :mod:`.launcher`."""

from ..process import run_cli
from .launcher import command

run_cli(command, interrupted="interrupted")
