"""The known-answer check (ops/known_answer.py): a device that merges the known tensors like the
reference passes and the report says so; one that differs in a single value refuses the merge in
one line naming the device, the case and what differed, before anything is written. The "device"
here is the CPU with the torch backend, or Triton's interpreter, made untrusted for the test."""

from __future__ import annotations

import json

import pytest
import torch
from backends import needs_interpreter
from checkpoints import tiny_pair

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.merge import main
from fusion_kernels.ops import known_answer, registry
from fusion_kernels.ops.known_answer import CASES, DeviceCheckError, check_device
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.ops.registry import Backend

CPU = torch.device("cpu")


@pytest.fixture
def untrusted_cpu(monkeypatch):
    """The CPU checked like a GPU, with a backend ``perturbed`` that flips a value's last bit in
    the cases ``perturb`` selects (``"value"``; ``"far"``: a bit 256 ulps up, past the 1 ulp
    allowed where a scale is a ratio of float64 sums) or reports one kept entry more
    (``"kept"``)."""
    monkeypatch.setattr(known_answer, "TRUSTED_DEVICE_TYPES", ())
    perturb = {"what": None, "when": lambda params: True}

    def kernel(base, tuned, out, name, axis, params):
        stats = merge_reference(base, tuned, out, name, axis, params)
        if perturb["what"] in ("value", "far") and perturb["when"](params):
            bits = out.view(-1).view({2: torch.int16, 4: torch.int32}[out.element_size()])
            bits[7] ^= 1 if perturb["what"] == "value" else 1 << 8
        if perturb["what"] == "kept" and perturb["when"](params):
            stats.kept += 1
        return stats

    monkeypatch.setitem(
        registry._REGISTRY, "perturbed", Backend("perturbed", lambda: kernel, ("cpu",))
    )
    return perturb


def test_the_cases_cover_every_selection_and_restore_path():
    covered = {(p.suppress, p.restore, p.select, p.rescale_mode) for p, *_ in CASES}
    assert {s for s, *_ in covered} == {"none", "magnitude", "breadcrumbs", "random", "della"}
    assert {r for _, r, *_ in covered} == {"none", "replace", "rescale"}
    assert {"exact", "approx"} <= {s for *_, s, _ in covered}
    assert {"l1", "inverse"} <= {m for *_, m in covered}
    assert {axis for _, _, axis, _ in CASES} == {"row", "col", "none"}


def test_a_trusted_device_is_not_checked():
    assert check_device(CPU, "perturbed-or-anything", params_for("ties")) is None


def test_a_device_that_agrees_passes(untrusted_cpu):
    result = check_device(CPU, "perturbed", params_for("neu-p-ties"))
    assert result == {
        "device": "cpu",
        "backend": "perturbed",
        "cases": len(CASES) + 1,
        "passed": True,
    }


@needs_interpreter
def test_triton_under_its_interpreter_passes(monkeypatch):
    monkeypatch.setattr(known_answer, "TRUSTED_DEVICE_TYPES", ())
    result = check_device(CPU, "triton", params_for("neu-s-ties", select="approx"))
    assert result["passed"] and result["backend"] == "triton"


def _magnitude(p):
    return p.suppress == "magnitude" and p.select == "exact"


def _della(p):
    return p.suppress == "della" and p.rescale_mode == "inverse"


@pytest.mark.parametrize(
    ("what", "when", "said"),
    [
        ("value", _magnitude, "suppress magnitude, restore replace, axis row, bfloat16"),
        ("far", _della, "suppress della, restore rescale, rescale inverse, axis col, float32"),
        ("kept", lambda p: p.suppress == "breadcrumbs", "kept is "),
    ],
)
def test_one_wrong_value_refuses_naming_device_case_and_difference(untrusted_cpu, what, when, said):
    untrusted_cpu.update(what=what, when=when)
    with pytest.raises(DeviceCheckError) as info:
        check_device(CPU, "perturbed", params_for("ties"))
    message = str(info.value)
    assert message.startswith("known-answer check failed on cpu (backend perturbed, ")
    assert said in message and message.endswith("use --device cpu") and "\n" not in message
    if what != "kept":
        assert "1 of " in message and "first at flat index 7" in message


def test_the_user_parameters_are_a_case_too(untrusted_cpu):
    untrusted_cpu.update(what="far", when=lambda p: p.weight == 0.37)
    with pytest.raises(DeviceCheckError, match="suppress magnitude, restore rescale"):
        check_device(CPU, "perturbed", params_for("neu-s-ties", weight=0.37))


def test_the_merge_refuses_before_writing_and_reports_the_check(untrusted_cpu, tmp_path, capsys):
    base, tuned = tiny_pair(tmp_path)
    report = merge_checkpoints(
        base, tuned, tmp_path / "ok", params_for("ties"), backend="perturbed", progress=False
    )
    assert report["device_check"]["passed"] and report["device_check"]["device"] == "cpu"
    saved = json.loads((tmp_path / "ok" / "fusion_report.json").read_text())
    assert saved["device_check"] == report["device_check"]
    untrusted_cpu.update(what="value")
    out = tmp_path / "refused"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--backend", "perturbed"]
    capsys.readouterr()
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: known-answer check failed on cpu") and "\n" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
