"""What the writer needs to know of a merge plan, so that writing depends on no planner.

:class:`~fusion_kernels.plan.planner.MergePlan` has this shape; so may any other plan of
output shards (the text export builds one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .checkpoint import TensorInfo


class PlannedShard(Protocol):
    """One output file and the tensors it holds, in write order."""

    filename: str
    names: list[str]


class PlannedTensor(Protocol):
    """One output tensor; it has ``tuned``'s dtype and shape."""

    tuned: TensorInfo


class WritePlan(Protocol):
    """The output's tensors by name, its shards, and the bytes it holds in all."""

    tasks: Mapping[str, PlannedTensor]
    shards: Sequence[PlannedShard]

    @property
    def nbytes(self) -> int: ...
