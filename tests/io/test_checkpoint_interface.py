"""Every input kind implements the whole checkpoint interface: opened from tiny checkpoints,
each answers every method, and the answers agree with a plain read of the tensor."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import cache_repo, tiny_pair
from safetensors.torch import save_file

import fusion_kernels
from fusion_kernels.io.checkpoint import Checkpoint
from fusion_kernels.io.sources import open_checkpoint

KINDS = ["safetensors", "safetensors-file", "bin", "lora", "hub"]


def to_bin(source: Path, target: Path) -> Path:
    """``source`` (a safetensors checkpoint) as one ``pytorch_model.bin``."""
    ckpt = open_checkpoint(source)
    target.mkdir(parents=True)
    torch.save({n: ckpt.read(n) for n in ckpt.names()}, target / "pytorch_model.bin")
    return target


def adapter_for(model: Path, target: Path) -> Path:
    """A LoRA adapter of rank 2 on one projection of ``model``, and a replaced embedding."""
    ckpt = open_checkpoint(model)
    weight = ckpt.info("model.layers.0.self_attn.q_proj.weight")
    embed = ckpt.info("model.embed_tokens.weight")
    generator = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model."
    tensors = {
        f"{prefix}layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            2, weight.shape[1], generator=generator
        ),
        f"{prefix}layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            weight.shape[0], 2, generator=generator
        ),
        f"{prefix}embed_tokens.modules_to_save.weight": torch.randn(
            *embed.shape, generator=generator
        ).to(embed.torch_dtype),
    }
    target.mkdir(parents=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(params=KINDS)
def opened(request, tmp_path, monkeypatch) -> tuple[str, Checkpoint]:
    _, tuned = tiny_pair(tmp_path / "in", shards=1)
    kind = request.param
    if kind == "safetensors-file":
        reference = str(tuned / "model.safetensors")
    elif kind == "bin":
        reference = str(to_bin(tuned, tmp_path / "bin"))
    elif kind == "lora":
        reference = f"{tuned}+{adapter_for(tuned, tmp_path / 'adapter')}"
    elif kind == "hub":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        cache_repo(tmp_path / "cache", "org/tiny", tuned)
        reference = "org/tiny"
    else:
        reference = str(tuned)
    ckpt = open_checkpoint(reference)
    yield kind, ckpt
    ckpt.close()


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def test_every_kind_lists_its_tensors_and_says_what_named_it(opened):
    kind, ckpt = opened
    assert isinstance(ckpt, Checkpoint)
    assert not type(ckpt).__abstractmethods__
    assert ckpt.names() and set(ckpt.names()) == set(ckpt.tensors)
    assert ckpt.nbytes == sum(ckpt.info(n).nbytes for n in ckpt.names()) > 0
    assert all(name in ckpt for name in ckpt.names()) and "no such tensor" not in ckpt
    assert ckpt.reference and ckpt.roots and ckpt.files and ckpt.directory.is_dir()
    assert (ckpt.adapter_dir is not None) == (kind == "lora")
    if kind == "hub":
        assert ckpt.reference == "org/tiny" and len(ckpt.roots) == 2


def test_every_read_of_every_kind_gives_the_same_bytes(opened):
    _, ckpt = opened
    for name in ckpt.names():
        info = ckpt.info(name)
        want = as_bytes(ckpt.read(name))
        assert len(want) == info.nbytes
        ckpt.prefetch(name)
        ckpt.warm(name)
        assert np.array_equal(as_bytes(ckpt.view(name)), want), name
        ckpt.release(name)
        lazy = ckpt.view(name, populate=False)
        ckpt.populate(name, 0, info.nbytes)
        assert np.array_equal(as_bytes(lazy), want), name
        ckpt.release(name, 0, info.nbytes)
        assert isinstance(ckpt.mappable(name), bool)
        out = np.empty(info.nbytes, dtype=np.uint8)
        ckpt.read_into(name, 0, out)
        assert np.array_equal(out, want), name
        with pytest.raises(ValueError, match="outside tensor"):
            ckpt.read_into(name, info.nbytes, np.empty(1, dtype=np.uint8))


def test_direct_reads_and_row_origins_agree_with_reads(opened):
    _, ckpt = opened
    for name in ckpt.names():
        want = ckpt.read(name)
        size = ckpt.direct_bytes(name)
        if size is not None:
            got = ckpt.read_direct(name, torch.empty(size, dtype=torch.uint8))
            if got is not None:  # None: read it another way (cached, or not aligned)
                assert torch.equal(as_bytes_tensor(got), as_bytes_tensor(want)), name
                ckpt.release(name)
        origin = ckpt.row_origin(name)
        if origin is not None:
            holder, info = origin
            rows = holder.read(info.name).to(want.dtype)
            assert torch.equal(as_bytes_tensor(rows), as_bytes_tensor(want)), name


def as_bytes_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_a_kind_that_reads_only_plainly_gets_the_plain_defaults(tmp_path):
    _, tuned = tiny_pair(tmp_path / "in", shards=1)
    source = open_checkpoint(tuned)

    class Plain(Checkpoint):
        def __init__(self):
            super().__init__(tuned)
            self.files, self.tensors = source.files, source.tensors

        def view(self, name, populate=True):
            return source.read(name)

        def read(self, name):
            return source.read(name)

        def _read_range(self, name, offset, out):
            source.read_into(name, offset, out)

        def close(self):
            source.close()

    plain = Plain()
    name = plain.names()[0]
    assert plain.direct_bytes(name) is None
    assert plain.read_direct(name, torch.empty(1 << 20, dtype=torch.uint8)) is None
    assert not plain.mappable(name)
    assert plain.row_origin(name) == (plain, plain.info(name))
    assert plain.adapter_dir is None and plain.reference == str(tuned)
    plain.prefetch(name), plain.warm(name), plain.populate(name), plain.release(name)
    plain.close()


def test_the_package_never_probes_a_checkpoint_or_transport_for_attributes():
    root = Path(fusion_kernels.__file__).parent
    probe = re.compile(r"\b(hasattr|getattr)\(\s*(self\.)?\w*(ckpt|checkpoint|transport|model)\b")
    found = [
        f"{path.relative_to(root)}: {line.strip()}"
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if probe.search(line)
    ]
    assert found == []
