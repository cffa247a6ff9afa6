"""Error types. Every error a user can cause is a :class:`FusionError`: the CLI prints its
message on one line and exits with status 2."""

from __future__ import annotations


class FusionError(Exception):
    """A problem with the user's input or environment; the message names the file/tensor and fix."""


class CheckpointError(FusionError):
    """A checkpoint that is missing, malformed or inconsistent with its index."""


class PlanError(FusionError):
    """Base and tuned checkpoints that cannot be merged (shape/dtype mismatch, bad rules)."""


class ParameterError(FusionError, ValueError):
    """A merge parameter outside its allowed range or an unknown choice."""


class NonFiniteDeltaError(FusionError):
    """tuned − base contains NaN or ±Inf for a tensor (see ``allow_nonfinite``)."""

    def __init__(self, name: str, count: int | None = None):
        self.name = name
        detail = f" ({count} entries)" if count is not None else ""
        super().__init__(
            f"tensor {name!r}: tuned - base is not finite{detail}; fix the checkpoint or pass "
            "--allow-nonfinite to copy such tensors unchanged from tuned"
        )


class BackendUnavailableError(FusionError):
    """A backend requested by name that cannot run here."""


class OutputExistsError(FusionError):
    """The output directory exists and ``overwrite`` was not given."""
