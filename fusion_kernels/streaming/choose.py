"""Which transport a merge moves its tensors through."""

from __future__ import annotations

import torch

from ..io.directio import direct_io_enabled
from .host import HostTransport
from .staged import StagedTransport, staging_size
from .transport import Transport


def make_transport(
    device: torch.device, staging_bytes: int | None, budget: int | None = None
) -> Transport:
    """Staged for CUDA (or when a staging size is given), whole tensors otherwise.

    ``budget``: the memory budget in bytes. The staging buffers (four) default to a quarter of
    it, at most :data:`~fusion_kernels.streaming.staged.DEFAULT_STAGING_BYTES`; the host path
    keeps buffers of up to a sixth of it (see :mod:`fusion_kernels.streaming.chunks`): with
    direct reads (``FUSION_KERNELS_DIRECT_IO=0`` turns them off) four inputs and two outputs,
    else three outputs.
    """
    if device.type == "cuda" or staging_bytes is not None:
        return StagedTransport(device, staging_bytes or staging_size(budget))
    keep = 0 if budget is None else budget // 6
    if direct_io_enabled():
        # The next pair is read into buffers of this process: two outputs fill the six.
        return HostTransport(device, keep, outputs=2, direct=True)
    # Three outputs: the next pair is read ahead into the page cache, not into this process,
    # so a third result may wait for the writer in its place.
    return HostTransport(device, keep, outputs=3)
