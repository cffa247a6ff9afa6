"""The README's guarantees, each against the input that used to break it: inputs are never
touched (written, moved, deleted, followed through links), an output appears whole or not at all,
and every bad input is exit 2 with one line naming the file or flag."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from checkpoints import tiny_pair, tree_digest, write_single
from commands import cli, merge, one_error_line, partials, refused, run
from safetensors.torch import load_file, save_file

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.errors import CheckpointError, OutputExistsError, ParameterError
from fusion_kernels.io import outputs as outputs_module
from fusion_kernels.io.outputs import MARKER_NAME, PREVIOUS_NAME
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.io.writer import CheckpointWriter
from fusion_kernels.merge import main as merge_main

PARAMS = params_for("ties")


@pytest.fixture
def pair(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in")
    return base, tuned, tree_digest(tmp_path / "in")


# --- inputs are out of reach of the output -------------------------------------------------------


def hf_cache(root, tensors):
    """A Hugging Face cache layout: snapshots/REV/* are links to blobs/SHA."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "rev1"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file(tensors, str(blobs / "sha-model"))
    (blobs / "sha-config").write_text('{"model_type": "llama"}')
    (snapshot / "model.safetensors").symlink_to("../../blobs/sha-model")
    (snapshot / "config.json").symlink_to("../../blobs/sha-config")
    return snapshot


@pytest.mark.parametrize("target", ["blobs", "blobs/sha-model", "snapshots", "."])
def test_overwrite_never_reaches_a_blob_of_a_symlinked_cache(tmp_path, target):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = hf_cache(tmp_path / "cache", {"w": torch.ones(4, 4)})
    before = tree_digest(tmp_path / "cache")
    out = tmp_path / "cache" / target
    done = run(merge("--base", base, "--tuned", tuned, "--out", out, "--overwrite"))
    refused(done, "overlaps the input")
    assert tree_digest(tmp_path / "cache") == before
    assert (tuned / "model.safetensors").resolve().is_file()


def test_overwrite_never_removes_a_shard_linked_into_the_output(tmp_path):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    elsewhere = write_single(tmp_path / "out", {"w": torch.ones(4, 4)})
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    done = run(merge("--base", base, "--tuned", tuned, "--out", elsewhere, "--overwrite"))
    assert done.returncode == 2 and (elsewhere / "model.safetensors").is_file()
    one_error_line(done, "overlaps the input")


def test_a_symlinked_cache_as_input_merges_normally(tmp_path):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = hf_cache(tmp_path / "cache", {"w": torch.ones(4, 4)})
    before = tree_digest(tmp_path / "cache")
    merge_checkpoints(base, tuned, tmp_path / "merged", PARAMS, progress=False)
    assert (tmp_path / "merged" / "config.json").read_text() == '{"model_type": "llama"}'
    assert not (tmp_path / "merged" / "config.json").is_symlink()
    assert tree_digest(tmp_path / "cache") == before


def test_locate_refuses_an_input_directory_as_out(pair, tmp_path):
    base, tuned, before = pair
    for out in (tuned, tuned / "report", tmp_path / "in"):
        done = run(cli("locate", "--base", base, "--tuned", tuned, "--out", out, "--quiet"))
        refused(done, "overlaps the input")
    assert tree_digest(tmp_path / "in") == before


def test_sweep_refuses_an_out_that_holds_an_input(pair, tmp_path):
    base, tuned, before = pair
    sweep = cli(
        "sweep", "--base", base, "--tuned", tuned, "--out", tmp_path / "in",
        "--grid", "method=ties", "--eval", "fusion_kernels.experiments.miniature:evaluate",
    )  # fmt: skip
    done = run(sweep)
    refused(done, "overlaps the input")
    assert tree_digest(tmp_path / "in") == before


def test_mergekit_launcher_refuses_a_model_directory_as_out(pair, tmp_path):
    pytest.importorskip("mergekit")
    base, tuned, before = pair
    config = tmp_path / "c.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n"
        "    parameters: {weight: 1.0, density: 0.5}\ndtype: bfloat16\n"
    )
    done = run(cli("mergekit", config, tuned))
    refused(done, "overlaps the input")
    assert tree_digest(tmp_path / "in") == before


def test_a_shard_named_like_a_file_the_writer_creates_is_refused(tmp_path):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for shard in ("config.json", "fusion_report.json"):
        save_file({"w": torch.ones(4, 4)}, str(tuned / shard))
        index = {"weight_map": {"w": shard}}
        (tuned / "model.safetensors.index.json").write_text(json.dumps(index))
        done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o", "--verify"))
        assert done.returncode == 2 and not (tmp_path / "o").exists()
        one_error_line(done, "not a .safetensors file name")
        (tuned / shard).unlink()


# --- only our own temporary directories are removed ----------------------------------------------


def test_stale_cleanup_touches_only_marked_directories(pair, tmp_path):
    base, tuned, _ = pair
    # Look-alikes without a marker: an input, another output's backup, a glob-shaped name.
    lookalikes = [tmp_path / ".out.partial-999999", tmp_path / ".out.old-999999"]
    lookalikes.append(tmp_path / ".merged.old-999999")
    for path in lookalikes:
        write_single(path, {"w": torch.zeros(2)})
    digest = {p.name: tree_digest(p) for p in lookalikes}
    for out in ("out", "m*"):
        merge_checkpoints(base, tuned, tmp_path / out, PARAMS, progress=False)
    for path in lookalikes:
        assert tree_digest(path) == digest[path.name], path
    # A workspace of ours, left by a killed run (its process is gone), with a glob-hostile name.
    out = tmp_path / "model[v2]"
    stale = tmp_path / ".model[v2].partial-999999"
    (stale / "output").mkdir(parents=True)
    (stale / MARKER_NAME).write_text(json.dumps({"output": out.name, "pid": 999999}))
    merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    assert not stale.exists()


def test_a_killed_swap_gives_the_previous_output_back(pair, tmp_path):
    base, tuned, _ = pair
    out = tmp_path / "out"
    merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    first = tree_digest(out)
    # A run killed after moving the previous output aside and before moving its own in.
    stale = tmp_path / ".out.partial-999999"
    stale.mkdir()
    (stale / MARKER_NAME).write_text(json.dumps({"output": "out", "pid": 999999}))
    os.rename(out, stale / PREVIOUS_NAME)
    with pytest.raises(OutputExistsError):
        merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    assert tree_digest(out) == first and not stale.exists()


# --- the output appears in one step, once --------------------------------------------------------


def test_an_output_that_appears_during_the_merge_is_not_replaced(pair, tmp_path):
    base, tuned, _ = pair
    out = tmp_path / "out"
    refused = pytest.raises(OutputExistsError, match="appeared while this merge ran")
    with refused, CheckpointWriter(out, _plan(base, tuned)) as writer:
        write_single(out, {"other": torch.ones(3)})  # another run finished first
        _write_all(writer, tuned)
        writer.commit(None, {})
    assert set(load_file(out / "model.safetensors")) == {"other"}
    assert partials(tmp_path) == []


def test_overwrite_does_not_replace_a_foreign_directory_that_appears_during_the_merge(
    pair, tmp_path
):
    base, tuned, _ = pair
    out = tmp_path / "out"
    refused = pytest.raises(OutputExistsError, match="not an earlier merge output")
    with refused, CheckpointWriter(out, _plan(base, tuned), overwrite=True) as writer:
        out.mkdir()
        (out / "notes.txt").write_text("someone else's")
        _write_all(writer, tuned)
        writer.commit(None, {})
    assert (out / "notes.txt").read_text() == "someone else's"
    assert partials(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_without_renameat2_the_same_guarantees_hold(pair, tmp_path, monkeypatch, overwrite):
    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(outputs_module, "_renameat2", unsupported)
    base, tuned, _ = pair
    out = tmp_path / "out"
    merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    if overwrite:
        merge_checkpoints(base, tuned, out, params_for("dare"), overwrite=True, progress=False)
        assert json.loads((out / "fusion_report.json").read_text())["params"]["suppress"] == (
            "random"
        )
    else:
        writer = CheckpointWriter(tmp_path / "o2", _plan(base, tuned))
        with pytest.raises(OutputExistsError), writer:
            (tmp_path / "o2").mkdir()
            _write_all(writer, tuned)
            writer.commit(None, {})
    assert partials(tmp_path) == []


def test_two_concurrent_merges_into_one_new_out_exactly_one_wins(pair, tmp_path):
    base, tuned, before = pair
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            merge("--base", base, "--tuned", tuned, "--out", out, "--method", m),
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in ("ties", "dare")
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    one_error_line(next(err for code, err in results if code == 2))
    winner = ["ties", "dare"][[code for code, _ in results].index(0)]
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["params"]["suppress"] == {"ties": "magnitude", "dare": "random"}[winner]
    assert partials(tmp_path) == [] and tree_digest(tmp_path / "in") == before


def _plan(base, tuned):
    from fusion_kernels.pipeline import plan_merge

    return plan_merge(base, tuned)[2]


def _write_all(writer, tuned):
    ckpt = Checkpoint(tuned)
    for name in ckpt.names():
        writer.write(name, ckpt.read(name))


# --- bad input: exit 2, one line, nothing written ------------------------------------------------


BAD_FLAGS = [
    (["--weight", "1e300"], "finite float32"),
    (["--weight=-3.5e38"], "finite float32"),
    (["--set", "mlp:weight=1e300"], "finite float32"),
    (["--set", "(:density=0.3"], "bad regular expression"),
    (["--set", "(:density=0.3", "--dry-run"], "bad regular expression"),
    (["--staging-size", "100TB"], "cannot allocate"),
    (["--device", "bogus"], "not a device"),
    (["--device", "meta"], "not supported"),
    (["--device", "cuda:7"], "CUDA device"),
]


@pytest.mark.parametrize("flags,fragment", BAD_FLAGS, ids=[" ".join(f)[:30] for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_nothing_written(pair, tmp_path, capsys, flags, fragment):
    base, tuned, before = pair
    out = tmp_path / "out"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet", *flags]
    assert merge_main(args) == 2
    one_error_line(capsys.readouterr().err, fragment)
    assert not out.exists() and partials(tmp_path) == []
    assert tree_digest(tmp_path / "in") == before


@pytest.mark.parametrize("flag", ["--max-shard-size", "--staging-size"])
def test_a_401_digit_size_is_a_usage_error_not_a_traceback(pair, tmp_path, capsys, flag):
    base, tuned, _ = pair
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o")]
    assert merge_main([*args, flag, "1" + "0" * 400]) == 2
    one_error_line(capsys.readouterr().err, "is too large; at most 8EiB")
    assert not (tmp_path / "o").exists()


def test_device_cuda_without_a_gpu_is_one_line(pair, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, tuned, _ = pair
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o"), "--quiet"]
    assert merge_main([*args, "--device", "cuda"]) == 2
    one_error_line(capsys.readouterr().err, "no CUDA device here")


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("tool", ["merge", "locate"])
@pytest.mark.parametrize("where", ["index", "header"])
def test_deeply_nested_json_is_one_line(tmp_path, tool, where):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = write_single(tmp_path / "tuned", {"w": torch.ones(4, 4)})
    if where == "index":
        index = '{"weight_map": {"w": "model.safetensors"}, "metadata": ' + deep_json(100000) + "}"
        (tuned / "model.safetensors.index.json").write_text(index)
    else:
        header = ('{"__metadata__": {}, "x": ' + deep_json(100000) + "}").encode()
        (tuned / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    before = tree_digest(tmp_path)
    done = run(cli(tool, "--base", base, "--tuned", tuned, "--out", tmp_path / "o", "--quiet"))
    refused(done, "nested deeper")
    assert tree_digest(tmp_path) == before


CONFIGS = {
    "not-utf8": "merge_method: ties\nbase_model: caf\xe9\n".encode("latin-1"),
    "deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
    "alias-bomb": (
        "merge_method: ties\nparameters:\n  density:\n"
        "    - filter: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"      b{i}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(9)
        )
        + "      value: 0.3\n"
    ).encode(),
    "weight-1e300": b"merge_method: task_arithmetic\nbase_model: B\nmodels:\n  - model: T\n"
    b"    parameters: {weight: 1.0e+300}\n",
    "huge": b"# " + b"x" * (2 << 20) + b"\n",
}


@pytest.mark.parametrize("name", CONFIGS)
def test_bad_configs_are_one_line(pair, tmp_path, capsys, name):
    base, tuned, _ = pair
    config = tmp_path / "c.yml"
    config.write_bytes(
        CONFIGS[name]
        .replace(b"base_model: B", f"base_model: {base}".encode())
        .replace(b"model: T", f"model: {tuned}".encode())
    )
    started = time.monotonic()
    assert merge_main(["--config", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert time.monotonic() - started < 30, "refused up front, not after expanding anything"
    one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_zero_size_tensor_with_a_dimension_past_int64_is_one_line(tmp_path, capsys):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = write_single(tmp_path / "tuned", {"w": torch.ones(4, 4)})
    header = {"e": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    (tuned / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o"), "--quiet"]
    assert merge_main(args) == 2
    one_error_line(capsys.readouterr().err, "malformed shape")


@pytest.mark.parametrize("metadata", [{"a": 1}, ["x"], "text", {"a": None}])
def test_metadata_is_validated_like_safetensors(tmp_path, metadata):
    path = write_single(tmp_path / "m", {"w": torch.ones(2)}) / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = metadata
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])
    with pytest.raises(CheckpointError, match="__metadata__ must map strings to strings"):
        Checkpoint(path)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    base = write_single(tmp_path / "base", {"w": torch.zeros(4, 4)})
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    os.mkfifo(tuned / "model.safetensors")
    done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o"))
    refused(done, "not a regular file (a named pipe)")
    (tuned / "model.safetensors").unlink()
    (tuned / "model.safetensors.index.json").mkdir()
    done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o"))
    refused(done, "not a regular file (a directory)")


def test_locate_out_that_is_a_file_and_a_bad_plot_regex_are_one_line(pair, tmp_path):
    base, tuned, _ = pair
    (tmp_path / "afile").write_text("x")
    locate = cli("locate", "--base", base, "--tuned", tuned)
    cases = [
        (["--out", tmp_path / "afile"], "existing file"),
        (["--out", tmp_path / "afile" / "sub"], "cannot write under"),
        (["--out", tmp_path / "o", "--plot-tensors", "(("], "bad regular expression"),
        (["--out", tmp_path / "o", "--device", "bogus"], "not a device"),
    ]
    for extra, fragment in cases:
        done = run([*locate, *extra, "--quiet"])
        refused(done, fragment)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert merge_main(["--demo", str(mine), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "not an earlier demo")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


# --- dtypes --------------------------------------------------------------------------------------


def test_unsigned_dtypes_are_copied_and_f64_is_reported_as_copied(tmp_path):
    extras = {
        "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16),
        "u32": torch.arange(5, dtype=torch.int64).to(torch.uint32),
        "f64": torch.randn(3, 3, dtype=torch.float64),
    }
    base = write_single(tmp_path / "b", {"w": torch.zeros(4, 4), **extras})
    tuned = write_single(tmp_path / "t", {"w": torch.ones(4, 4), **extras})
    report = merge_checkpoints(base, tuned, tmp_path / "o", PARAMS, progress=False, verify=True)
    out = load_file(tmp_path / "o" / "model.safetensors")
    for name, tensor in extras.items():
        assert out[name].dtype == tensor.dtype and torch.equal(
            out[name].view(torch.uint8), tensor.view(torch.uint8)
        )
    reasons = {t["name"]: t.get("reason") for t in report["tensors"]}
    assert reasons["u16"] == "U16 is not a float dtype"
    assert reasons["f64"] == "F64 is not a merge dtype (F32, F16, BF16)"


def test_a_config_accepts_a_checkpoint_with_an_f64_tensor(tmp_path):
    from fusion_kernels.mergekit.config import parse_merge_config

    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "t", "parameters": {"weight": 1.0, "density": 0.5}}],
        "dtype": "float32",
    }
    parse_merge_config(data).check_dtypes([torch.float32, torch.float64, torch.int64])
    with pytest.raises(ParameterError):
        parse_merge_config(data).check_dtypes([torch.bfloat16])


# --- interrupts and shards that change under us --------------------------------------------------


def test_a_shard_truncated_while_merging_is_a_clear_error(tmp_path):
    path = write_single(tmp_path / "t", {"a": torch.ones(1024), "b": torch.ones(1024)})
    ckpt = Checkpoint(path)
    ckpt.read("a")
    with open(path / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CheckpointError, match="changed size while being read"):
        ckpt.view("b")
    ckpt.close()


@pytest.mark.slow
def test_a_second_ctrl_c_still_exits_130_with_nothing_left(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in", hidden=256, intermediate=768, layers=8, vocab=2048)
    before = tree_digest(tmp_path / "in")
    for gap in (0.0, 0.002, 0.01, 0.05):
        out = tmp_path / "out"
        proc = subprocess.Popen(
            merge("--base", base, "--tuned", tuned, "--out", out, "--backend", "torch"),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not (tmp_path / f".out.partial-{proc.pid}").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = proc.stderr.read()
        if proc.returncode == 0:  # the merge finished before the signal
            import shutil

            shutil.rmtree(out)
            continue
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert not out.exists() and partials(tmp_path) == []
    assert tree_digest(tmp_path / "in") == before


# --- cases found beyond the issue ----------------------------------------------------------------


def test_out_that_is_a_symlink_to_an_input_is_refused(pair, tmp_path, capsys):
    base, tuned, before = pair
    link = tmp_path / "link"
    link.symlink_to(tuned)
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(link), "--overwrite"]
    assert merge_main([*args, "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "overlaps the input")
    assert tree_digest(tmp_path / "in") == before


def test_a_nan_epsilon_is_refused_so_the_report_stays_valid_json(pair, tmp_path, capsys):
    base, tuned, _ = pair
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o")]
    assert merge_main([*args, "--method", "ties", "--epsilon", "nan", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "epsilon must be a finite number")


def test_an_empty_checkpoint_is_refused(tmp_path):
    root = write_single(tmp_path / "t", {"w": torch.ones(2)})
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="holds no tensors"):
        Checkpoint(root)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"a,b\n1,2\n"])
def test_a_corrupt_sweep_results_table_is_one_line(pair, tmp_path, content):
    base, tuned, _ = pair
    sweep = cli(
        "sweep", "--base", base, "--tuned", tuned, "--out", tmp_path / "s",
        "--grid", "density=0.1", "--eval", "json:dumps",
    )  # fmt: skip
    run(sweep)  # creates the sweep (the eval fails; that is not what is tested)
    (tmp_path / "s" / "results.csv").write_bytes(content)
    done = run(sweep)
    refused(done, "results.csv")


def test_sweep_keep_removes_only_its_own_model_directories(tmp_path):
    from fusion_kernels.sweep import Keeper, Results

    models = tmp_path / "s" / "models"
    (models / "p1").mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    (tmp_path / "s" / "models" / "escape").symlink_to(outside)
    keeper = Keeper(Results(tmp_path / "s" / "results.csv"), "none", None, True, models)
    for model in (outside, models / "escape", models / "p1"):
        keeper._drop({"point": str(model), "model": str(model)})
    assert outside.is_dir() and (models / "escape").is_symlink()
    assert not (models / "p1").exists()


def test_overwrite_cannot_remove_the_config_it_was_given(pair, tmp_path, capsys):
    base, tuned, _ = pair
    out = tmp_path / "out"
    merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    config = out / "c.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n"
        "    parameters: {weight: 1.0, density: 0.5}\n"
    )
    assert merge_main(["--config", str(config), "--out", str(out), "--overwrite", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "overlaps the input")
    assert config.is_file()


def test_overwrite_replaces_only_an_earlier_output_never_a_directory_holding_the_cwd(
    pair, tmp_path
):
    base, tuned, _ = pair
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    done = run(
        merge("--base", base, "--tuned", tuned, "--out", "..", "--overwrite"), cwd=home / "work"
    )
    refused(done, "not an earlier merge output")
    assert (home / "notes.txt").read_text() == "mine" and (home / "work").is_dir()
