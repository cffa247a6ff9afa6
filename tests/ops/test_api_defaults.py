"""The Python API and the CLI agree: one default method and one dtype rule for a base/tuned pair."""

import pytest
import torch
from checkpoints import tiny_pair
from conftest import make_pair
from safetensors.torch import load_file

from fusion_kernels import merge_tensor
from fusion_kernels.errors import ParameterError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main
from fusion_kernels.params import DEFAULT_METHOD, params_for


def test_merge_tensor_without_a_method_merges_as_the_cli_does(tmp_path):
    base, tuned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet"]) == 0
    merged = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    name = "model.layers.0.mlp.up_proj.weight"
    ours, stats = merge_tensor(base_ckpt.read(name), tuned_ckpt.read(name), name, backend="torch")
    assert torch.equal(ours, merged[name])
    assert stats.restored > 0, "Neuron-Fusion restores neurons; the SPEC defaults would not"
    assert not torch.equal(ours, tuned_ckpt.read(name))
    with_fields, _ = merge_tensor(
        base_ckpt.read(name), tuned_ckpt.read(name), name, backend="torch", density=0.5
    )
    expected, _ = merge_tensor(
        base_ckpt.read(name),
        tuned_ckpt.read(name),
        name,
        backend="torch",
        params=params_for(DEFAULT_METHOD, density=0.5),
    )
    assert torch.equal(with_fields, expected), "fields override the default, as CLI flags do"


@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_a_pair_of_two_dtypes_is_refused_as_the_planner_refuses_it(dtypes):
    base, tuned = make_pair((4, 6))
    with pytest.raises(ParameterError, match="so the dtypes agree"):
        merge_tensor(base.to(dtypes[0]), tuned.to(dtypes[1]), "w", method=None)
