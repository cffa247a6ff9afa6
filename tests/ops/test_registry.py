"""The backend registry: registration without importing anything heavy, ``auto``'s fallback
(logged once), and the errors of a backend asked for by name that cannot run."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_pair

from fusion_kernels.errors import BackendUnavailableError
from fusion_kernels.ops import merge_tensor, registry, select_backend
from fusion_kernels.ops import triton as triton_backend
from fusion_kernels.ops.reference import merge_reference

NAME = "model.layers.0.mlp.up_proj.weight"
# The registry as the package leaves it, before any test swaps it.
REGISTERED = dict(registry._REGISTRY)


@pytest.fixture
def only_torch(monkeypatch):
    """A registry holding the torch reference alone, with no fallback warned about yet."""
    monkeypatch.setattr(registry, "_REGISTRY", {"torch": registry._REGISTRY["torch"]})
    monkeypatch.setattr(registry, "_warned", set())
    return registry._REGISTRY


def _unavailable(name: str, why: str, hint: str) -> registry.Backend:
    def load():
        raise ImportError(why)

    return registry.Backend(name, load, devices=("cpu",), hint=hint)


def test_importing_the_package_imports_neither_triton_nor_the_extension():
    code = (
        "import sys, fusion_kernels, torch\n"
        "from fusion_kernels.ops import registered_backends\n"
        "assert registered_backends() == ['torch', 'cpp', 'triton'], registered_backends()\n"
        "assert 'triton' not in sys.modules and 'fusion_kernels._cpp' not in sys.modules\n"
        "fusion_kernels.merge_tensor(torch.ones(3, 4), torch.zeros(3, 4), 'x', backend='torch')\n"
        "assert 'triton' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_falls_back_and_logs_each_fallback_once(only_torch, caplog, monkeypatch):
    registry.register_backend(_unavailable("fast", "not built", "Build it with make."))
    monkeypatch.setattr(registry, "_AUTO_ORDER", {"cpu": ("fast", "torch")})
    base, tuned = make_pair((7, 13))
    with caplog.at_level(logging.WARNING, logger="fusion_kernels"):
        for _ in range(3):
            assert merge_tensor(base, tuned, NAME, backend="auto")[1].backend == "torch"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'fast' unavailable (not built)" in warnings[0] and "Build it with make." in warnings[0]


def test_a_backend_asked_for_by_name_says_why_what_is_available_and_how_to_get_it(only_torch):
    registry.register_backend(_unavailable("fast", "No module named 'fast'", "pip install fast."))
    base, tuned = make_pair((7, 13))
    with pytest.raises(
        BackendUnavailableError,
        match=r"'fast' is not available: No module named 'fast'\. pip install fast\. "
        r"Available here: torch\.",
    ):
        merge_tensor(base, tuned, NAME, backend="fast", suppress="magnitude")


def test_cpp_without_its_extension_says_how_to_build_it(only_torch, monkeypatch):
    cpp = dataclasses.replace(REGISTERED["cpp"], _fn=None, _error=None)

    def not_built():
        raise ImportError("No module named 'fusion_kernels._cpp'")

    monkeypatch.setattr(cpp, "load", not_built)
    registry.register_backend(cpp)
    base, tuned = make_pair((7, 13))
    with pytest.raises(BackendUnavailableError, match=r"'cpp' is not available.*pip install -e"):
        merge_tensor(base, tuned, NAME, backend="cpp", suppress="magnitude")


def test_triton_without_a_gpu_or_the_interpreter_says_how_to_get_it(only_torch, monkeypatch):
    registered = REGISTERED["triton"]
    assert registered.devices == (("cuda", "cpu") if triton_backend.interpreting() else ("cuda",))
    assert registered.scores is triton_backend.scores_triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises((ImportError, RuntimeError)):
        triton_backend.load()
    registry.register_backend(dataclasses.replace(registered, _fn=None, _error=None))
    with pytest.raises(BackendUnavailableError, match=r"TRITON_INTERPRET=1.*Available here: torch"):
        select_backend("triton", "cuda")


def test_unknown_backend_and_wrong_device_are_clear_errors(monkeypatch):
    base, tuned = make_pair((4, 4))
    monkeypatch.setenv("FUSION_KERNELS_BACKEND", "torch")
    assert merge_tensor(base, tuned, "x")[1].backend == "torch"
    monkeypatch.setenv("FUSION_KERNELS_BACKEND", "fortran")
    with pytest.raises(
        BackendUnavailableError,
        match=r"^\$FUSION_KERNELS_BACKEND 'fortran' is not a backend; registered: auto, .*unset",
    ):
        merge_tensor(base, tuned, "x")
    with pytest.raises(BackendUnavailableError, match=r"^backend 'fortran' is not a backend"):
        merge_tensor(base, tuned, "x", backend="fortran")
    fake = registry.Backend("cpu-only", lambda: merge_reference, devices=("cpu",))
    monkeypatch.setitem(registry._REGISTRY, "cpu-only", fake)
    with pytest.raises(BackendUnavailableError, match="runs on cpu tensors, not cuda"):
        select_backend("cpu-only", "cuda")


def test_a_bad_backend_variable_is_named_before_any_work(tmp_path):
    from checkpoints import tiny_pair

    base, tuned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fusion_kernels.merge", "--base", base, "--tuned", tuned,
         "--out", out, "--quiet"],
        capture_output=True, text=True, env={**os.environ, "FUSION_KERNELS_BACKEND": "bogus"},
    )  # fmt: skip
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        "error: $FUSION_KERNELS_BACKEND 'bogus' is not a backend; registered: auto, "
        f"{', '.join(REGISTERED)}; unset $FUSION_KERNELS_BACKEND or set it to one of them"
    ]
