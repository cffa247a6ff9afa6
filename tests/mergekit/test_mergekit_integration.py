"""mergekit integration (issue 6): mergekit YAML files read by ``merge --config`` against stock
``mergekit-yaml`` on tiny transformers Llama models, the ``neuron_fusion`` method and the
accelerated sparsify through ``python -m fusion_kernels.mergekit``, and the accelerated sparsify's
properties (exact counts, norm preservation, determinism). The reader's own tests are in
test_mergekit_config.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_llama_config
from conftest import assert_tensors_equal, assert_within_ulp, make_pair

from fusion_kernels import merge_checkpoints, merge_tensor, params_for
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.mergekit.config import load_merge_config
from fusion_kernels.ops.contract import magnitude_window

transformers = pytest.importorskip("transformers", reason="installed by the test extra")
yaml = pytest.importorskip("yaml", reason="installed with mergekit and transformers")
mergekit = pytest.importorskip("mergekit", reason="installed by the test extra")

from mergekit.merge_methods import merge_tensors  # noqa: E402
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify  # noqa: E402

import fusion_kernels.mergekit as fk_mergekit  # noqa: E402

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
# Tokenizers are absent from the tiny models and the model card looks names up online.
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--no-lazy-unpickle", "--quiet"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

# One tuned model with filters in both scopes. mergekit computes ((Δ·w)/w)·λ under normalize and
# (Δ·w)·λ otherwise, we compute Δ·α (α = λ or w·λ): the weights and lambdas here make both round
# alike (powers of two, or a single product), so float32 results are equal bit for bit.
DETERMINISTIC = {
    "task_arithmetic": {"model": {"weight": 0.7}},
    "ties": {
        "model": {
            "weight": 0.5,
            "density": [
                {"filter": "self_attn", "value": 0.3},
                {"filter": "mlp", "value": 0.5},
                {"value": 0.1},
            ],
        },
        "global": {"lambda": 2.0},
    },
    "breadcrumbs": {
        "model": {"weight": 1.0, "density": 0.3},
        "global": {
            "gamma": [{"filter": "down_proj", "value": 0.05}, {"value": 0.02}],
            "lambda": 0.75,
        },
    },
}


# ---------------------------------------------------------------------------------------------
# Models and runs


def build_llama(root: Path, dtype: torch.dtype, *, untied: bool, size: int = 64, seed: int = 0):
    """A tiny Llama saved with save_pretrained as ``root/base`` and ``root/tuned``.

    ``untied``: float32 base in [1, 1.5) and deltas that are a permutation of multiples of
    2^-16, so every |Δ| of a tensor is distinct and exact (any correct top-k picks one set).
    Otherwise: transformers' init, small dense changes and a few large up_proj neurons.
    """
    config = tiny_llama_config(
        hidden_size=size,
        intermediate_size=size * 3 // 2 if size == 64 else size * 2,
        vocab_size=size * 2,
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        if untied:
            for p in model.parameters():
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=gen))
        model.save_pretrained(root / "base")
        for name, p in model.named_parameters():
            if untied:
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                delta = (torch.randperm(p.numel(), generator=gen) + 1).reshape(p.shape) * sign
                before = p.clone()
                p.add_(delta * 2.0**-16)
                assert torch.equal(p - before, delta * 2.0**-16), "exact delta"
            else:
                p.add_(0.002 * torch.randn(p.shape, generator=gen).to(dtype))
                if name.endswith("mlp.up_proj.weight"):
                    p[:3].add_(0.2 * torch.randn(p[:3].shape, generator=gen).to(dtype))
        model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def f32_pair(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("f32"), torch.float32, untied=True)


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("bf16"), torch.bfloat16, untied=False)


@pytest.fixture(scope="module")
def wide_f32_pair(tmp_path_factory):
    """~0.4 M parameters, so kept fractions of random masks are within 1 % of density."""
    return build_llama(tmp_path_factory.mktemp("wide"), torch.float32, untied=False, size=128)


def write_config(path: Path, method: str, pair, model=None, global_=None, **top) -> Path:
    base, tuned = pair
    data = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(tuned), "parameters": model or {}}],
        **top,
    }
    if global_:
        data["parameters"] = global_
    path.write_text(yaml.safe_dump(data))
    return path


def run(command: list) -> subprocess.CompletedProcess:
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def stock_mergekit(config: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    run([MERGEKIT_YAML, config, out, *MERGEKIT_FLAGS, *flags])
    return read_all(out)


def launcher(config: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    run([sys.executable, "-m", "fusion_kernels.mergekit", config, out, *MERGEKIT_FLAGS, *flags])
    return read_all(out)


def ours(config: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``python -m fusion_kernels.merge --config`` will do, in process."""
    cfg = load_merge_config(config)
    tuned = Checkpoint(cfg.tuned)
    cfg.check_dtypes(tuned.info(name).torch_dtype for name in tuned.names())
    report = merge_checkpoints(
        cfg.base, cfg.tuned, out, cfg.params, rules=cfg.rules, progress=False
    )
    return read_all(out), report


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


def assert_same_checkpoint(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert_tensors_equal(actual[name], expected[name], name)


# ---------------------------------------------------------------------------------------------
# --config against stock mergekit


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_float32_merge_equals_stock_mergekit(tmp_path, f32_pair, method):
    case = DETERMINISTIC[method]
    config = write_config(tmp_path / "c.yml", method, f32_pair, case["model"], case.get("global"))
    theirs = stock_mergekit(config, tmp_path / "stock")
    mine, _ = ours(config, tmp_path / "ours")
    assert_same_checkpoint(mine, theirs)


def _tie_set(delta: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Entries whose |Δ| (rounded to bf16, as mergekit holds it) equals a magnitude at an edge
    of the kept window: which of them are kept depends on the tie-break."""
    magnitude = delta.abs().float().reshape(-1)
    ordered = magnitude.sort(descending=True).values
    edges = [
        ordered[i] for i in (start - 1, start, start + k - 1, start + k) if 0 <= i < len(ordered)
    ]
    tie = torch.zeros_like(magnitude, dtype=torch.bool)
    for value in edges:
        tie |= magnitude == value
    return tie


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_bfloat16_merge_matches_stock_mergekit_up_to_its_rounding(tmp_path, bf16_pair, method):
    """mergekit subtracts and adds in bf16 (Δ is rounded before it is added back); we do both
    in float32. Same kept counts; outside the tie set within 1 ulp, except where |Δ| exceeds
    the weights (a sign change): there mergekit's rounded Δ is off by up to half Δ's ulp."""
    case = DETERMINISTIC[method]
    # w = λ = 1: mergekit's bf16 products would add roundings of their own.
    model = {**case["model"], "weight": 1.0}
    global_ = {k: v for k, v in case.get("global", {}).items() if k != "lambda"}
    config = write_config(tmp_path / "c.yml", method, bf16_pair, model, global_)
    theirs = stock_mergekit(config, tmp_path / "stock")
    mine, report = ours(config, tmp_path / "ours")
    kept = {t["name"]: t["kept"] for t in report["tensors"]}
    base, tuned = read_all(bf16_pair[0]), read_all(bf16_pair[1])
    params = load_merge_config(config).params
    for name, expected in theirs.items():
        actual, b, t = mine[name].reshape(-1), base[name].reshape(-1), tuned[name].reshape(-1)
        expected = expected.reshape(-1)
        delta = t - b  # mergekit's bf16 delta
        n = delta.numel()
        if method == "task_arithmetic":
            outside = torch.ones(n, dtype=torch.bool)
        else:
            start, k = magnitude_window(params.for_tensor(name), n)
            assert kept[name] == k, name
            assert int((actual != b).sum()) == int((expected != b).sum()), f"{name}: kept"
            outside = ~_tie_set(delta, start, k)
        crossing = (t.float() - b.float()).abs() > torch.minimum(b.float().abs(), t.float().abs())
        grid = outside & ~crossing
        assert_within_ulp(actual[grid], expected[grid], 1, name)
        _, exponent = torch.frexp(delta.float()[outside & crossing])
        gap = (actual.float() - expected.float())[outside & crossing].abs()
        assert bool((gap <= torch.ldexp(torch.ones_like(gap), exponent - 8)).all()), name


@pytest.mark.parametrize(
    "method,params",
    [
        ("dare_linear", {"weight": 1.0, "density": 0.3}),
        ("della_linear", {"weight": 1.0, "density": 0.4, "epsilon": 0.1}),
    ],
)
def test_random_methods_keep_density_and_l1_norm_like_stock_mergekit(
    tmp_path, wide_f32_pair, method, params
):
    config = write_config(tmp_path / "c.yml", method, wide_f32_pair, params)
    theirs = stock_mergekit(config, tmp_path / "stock", "--random-seed", "0")
    mine, _ = ours(config, tmp_path / "ours")
    base, tuned = read_all(wide_f32_pair[0]), read_all(wide_f32_pair[1])
    kept = {"stock": 0, "ours": 0}
    n = 0
    for name, b in base.items():
        delta_l1 = (tuned[name].double() - b.double()).abs().sum().item()
        for who, merged in (("stock", theirs[name]), ("ours", mine[name])):
            kept[who] += int((merged != b).sum())
            l1 = (merged.double() - b.double()).abs().sum().item()
            assert l1 == pytest.approx(delta_l1, rel=0.01), f"{who} {name}"
        n += b.numel()
    for who, count in kept.items():
        assert count / n == pytest.approx(params["density"], rel=0.01), who


# ---------------------------------------------------------------------------------------------
# The launcher: neuron_fusion and accelerated mode inside mergekit


@pytest.mark.parametrize(
    "params",
    [
        {},
        {
            "suppress": "breadcrumbs",
            "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.2}],
            "gamma": 0.02,
            "restore": "rescale",
            "top_neurons": 0.2,
            "neuron_rules": r"up_proj=col;embed_tokens=row",
        },
    ],
    ids=["defaults", "bread-rescale-rules"],
)
def test_launcher_neuron_fusion_equals_our_merge_bit_for_bit(tmp_path, bf16_pair, params):
    config = write_config(tmp_path / "c.yml", "neuron_fusion", bf16_pair, params)
    theirs = launcher(config, tmp_path / "mergekit")
    mine, report = ours(config, tmp_path / "ours")
    assert report["params"]["restore"] == params.get("restore", "replace")
    assert_same_checkpoint(theirs, mine)


def test_launcher_accelerated_ties_equals_stock_on_float32(tmp_path, f32_pair):
    case = DETERMINISTIC["ties"]
    config = write_config(tmp_path / "c.yml", "ties", f32_pair, case["model"], case["global"])
    assert_same_checkpoint(
        launcher(config, tmp_path / "fast"), stock_mergekit(config, tmp_path / "s")
    )


def test_launcher_accelerated_dare_is_deterministic_and_equals_our_merge(tmp_path, f32_pair):
    config = write_config(
        tmp_path / "c.yml", "dare_linear", f32_pair, {"weight": 1.0, "density": 0.3}
    )
    theirs = launcher(config, tmp_path / "fast", "--random-seed", "5")
    cfg = load_merge_config(config)
    params = cfg.params.default.replace(seed=5)
    merge_checkpoints(cfg.base, cfg.tuned, tmp_path / "ours", params, progress=False)
    assert_same_checkpoint(theirs, read_all(tmp_path / "ours"))


def test_merge_cli_reads_a_mergekit_config(tmp_path, f32_pair):
    config = write_config(tmp_path / "c.yml", "ties", f32_pair, DETERMINISTIC["ties"]["model"])
    run(
        [
            sys.executable,
            "-m",
            "fusion_kernels.merge",
            "--config",
            config,
            "--out",
            tmp_path / "cli",
            "--quiet",
        ]
    )
    assert_same_checkpoint(read_all(tmp_path / "cli"), ours(config, tmp_path / "ours")[0])


# ---------------------------------------------------------------------------------------------
# The neuron_fusion method and the accelerated sparsify, in process


@pytest.fixture
def accelerated():
    fk_mergekit.install(accelerate=True)
    yield
    fk_mergekit.uninstall()


def untied_delta(shape, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (torch.randperm(n, generator=gen) + 1).reshape(shape) * 2.0**-16 * sign


def test_neuron_fusion_method_is_our_op_with_mergekits_tensor_name():
    fk_mergekit.register_method()
    base, tuned = make_pair((48, 40), torch.bfloat16, seed=3)
    name = "model.layers.0.mlp.up_proj.weight"
    merged = merge_tensors(
        [base, tuned],
        "neuron_fusion",
        base_index=0,
        name=name,
        parameters={"density": 0.3, "restore": "rescale", "neuron_rules": "up_proj=col"},
    )
    expected, _ = merge_tensor(
        base,
        tuned,
        name,
        axis="col",
        params=params_for("neuron_fusion", density=0.3, restore="rescale"),
    )
    assert_tensors_equal(merged, expected, name)
    with pytest.raises(ValueError, match="non-base"):
        merge_tensors([base, tuned, tuned.clone()], "neuron_fusion", base_index=0, name=name)


@pytest.mark.parametrize("density", [0.0, 1e-4, 0.05, 0.3, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (37,), (31, 17), (64, 48), (3, 5, 7)], ids=str)
def test_accelerated_magnitude_keeps_exact_counts(accelerated, shape, density):
    delta, _ = make_pair(shape, torch.float32, seed=1)
    n = delta.numel()
    result = fk_mergekit.accelerated_sparsify(delta, density, SparsificationMethod.magnitude)
    expected = n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))
    assert int((result != 0).sum()) == expected
    kept = result != 0
    assert torch.equal(result[kept], delta[kept])


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0)])
@pytest.mark.parametrize("shape", [(64, 48), (257, 31), (1000,)], ids=str)
def test_accelerated_outliers_keep_exact_counts_and_equal_stock(accelerated, shape, density, gamma):
    delta = untied_delta(shape)
    for kind in (SparsificationMethod.magnitude, SparsificationMethod.magnitude_outliers):
        result = fk_mergekit.accelerated_sparsify(delta, density, kind, gamma=gamma)
        count = (
            max(1, int(density * delta.numel()))
            if kind == "magnitude"
            else int(density * delta.numel())
        )
        assert int((result != 0).sum()) == count
        # Equal values; mergekit's dropped entries keep Δ's sign (-0.0), ours are +0.0.
        assert torch.equal(result, sparsify(delta, density, kind, gamma=gamma)), kind.value


def test_accelerated_magnitude_on_tied_bfloat16_keeps_exact_counts(accelerated):
    base, tuned = make_pair((128, 96), torch.bfloat16, seed=2, tied=True)
    delta = tuned - base
    for density in (0.1, 0.3, 0.6):
        result = fk_mergekit.accelerated_sparsify(delta, density, "magnitude")
        assert int((result != 0).sum()) == int(density * delta.numel())
        assert result.dtype == torch.bfloat16


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("kind", ["random", "della_magprune"])
def test_accelerated_random_methods_preserve_l1_and_density(accelerated, kind, density):
    delta = make_pair((512, 512), torch.float32, seed=4)[1] * 0.01
    result = fk_mergekit.accelerated_sparsify(
        delta, density, kind, epsilon=0.05, rescale_norm=RescaleNorm.l1
    )
    n = delta.numel()
    assert int((result != 0).sum()) / n == pytest.approx(density, rel=0.01)
    assert result.double().abs().sum().item() == pytest.approx(
        delta.double().abs().sum().item(), rel=1e-5
    )
    again = fk_mergekit.accelerated_sparsify(
        delta, density, kind, epsilon=0.05, rescale_norm=RescaleNorm.l1
    )
    assert_tensors_equal(again, result, "deterministic")
    plain = fk_mergekit.accelerated_sparsify(delta, density, kind, epsilon=0.05)
    kept = plain != 0
    assert torch.equal(plain[kept], delta[kept]), "no rescale unless asked"


def test_accelerated_magnitude_rescale_preserves_l1(accelerated):
    delta = untied_delta((64, 48))
    result = fk_mergekit.accelerated_sparsify(delta, 0.2, "magnitude", rescale_norm="l1")
    assert result.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-6)


def test_accelerated_edge_cases_follow_mergekit(accelerated):
    delta = untied_delta((16, 16))
    for kind in SparsificationMethod:
        assert fk_mergekit.accelerated_sparsify(delta, 1.0, kind, epsilon=0.1) is delta
        assert not fk_mergekit.accelerated_sparsify(delta, 0.0, kind, epsilon=0.1).any()
    with pytest.raises(ValueError, match="Epsilon"):
        fk_mergekit.accelerated_sparsify(delta, 0.1, "della_magprune", epsilon=0.2)
    column = fk_mergekit.accelerated_sparsify(delta[:, :1], 0.5, "della_magprune", epsilon=0.1)
    # mergekit's rank normalisation divides 0 by 0 there and fails; SPEC keeps with p = K.
    assert column.shape == (16, 1) and 0 < int((column != 0).sum()) < 16
    cube = untied_delta((4, 6, 8))
    torch.manual_seed(0)
    fast = fk_mergekit.accelerated_sparsify(cube, 0.5, "della_magprune", epsilon=0.1)
    torch.manual_seed(0)
    stock = sparsify(cube, 0.5, "della_magprune", epsilon=0.1)
    assert_tensors_equal(fast, stock, "della on 3-D tensors is mergekit's own (rows along dim 1)")
    l2 = fk_mergekit.accelerated_sparsify(delta, 0.3, "magnitude", rescale_norm="l2")
    assert_tensors_equal(l2, sparsify(delta, 0.3, "magnitude", rescale_norm=RescaleNorm.l2))


def test_accelerated_mode_inside_mergekits_methods(accelerated):
    """Through mergekit's own ties/dare: the tensor name reaches the draws, so a one-model DARE
    equals our op; a second model draws its own mask."""
    base = 1 + 0.5 * torch.rand(64, 48, generator=torch.Generator().manual_seed(0))
    tuned = base + untied_delta((64, 48), seed=1)
    name = "model.layers.3.self_attn.q_proj.weight"
    dare = merge_tensors(
        [base, tuned],
        "dare_linear",
        base_index=0,
        name=name,
        parameters={"weight": 1.0, "density": 0.3},
    )
    expected, _ = merge_tensor(
        base, tuned, name, suppress="random", density=0.3, axis="none", method=None
    )
    assert_tensors_equal(dare, expected, "dare_linear")
    fk_mergekit.uninstall()
    stock = merge_tensors(
        [base, tuned], "ties", base_index=0, name=name, parameters={"weight": 1.0, "density": 0.3}
    )
    fk_mergekit.install()
    fast = merge_tensors(
        [base, tuned], "ties", base_index=0, name=name, parameters={"weight": 1.0, "density": 0.3}
    )
    assert_tensors_equal(fast, stock, "ties")
    other = base + untied_delta((64, 48), seed=2)
    both = merge_tensors(
        [base, tuned, other],
        "dare_linear",
        base_index=0,
        name=name,
        parameters={"weight": 0.5, "density": 0.3, "rescale": False},
    )
    first = (dare - base) != 0
    second = ((both - base) * 2 - (dare - base)) != 0
    assert not torch.equal(first, second), "each model draws its own mask"


def test_importing_without_mergekit_fails_only_on_use():
    code = """
import sys
sys.modules["mergekit"] = None
import fusion_kernels.mergekit as mergekit
try:
    mergekit.install()
except mergekit.MergekitMissingError as exc:
    print("MISSING", exc)
sys.exit(mergekit.main(["c.yml", "out"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2, done.stderr
    assert "MISSING" in done.stdout and "pip install mergekit" in done.stdout
    assert "pip install 'fusion_kernels[test]'" in done.stderr
