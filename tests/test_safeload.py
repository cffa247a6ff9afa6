"""Reading small input documents safely: regular files only, size limits, strict UTF-8, bounded
JSON depth, no YAML aliases; each failure one message of the caller's error class."""

import os

import pytest

from fusion_kernels.errors import CheckpointError, FusionError, ParameterError
from fusion_kernels.io.safeload import (
    MAX_DEPTH,
    json_depth,
    load_json,
    load_yaml,
    open_regular,
    parse_json,
    read_bytes,
    read_text,
)


def test_a_regular_file_is_read_whole(tmp_path):
    path = tmp_path / "index.json"
    path.write_text('{"weight_map": {"w": "a.safetensors"}}')
    assert load_json(path, 1024) == {"weight_map": {"w": "a.safetensors"}}
    fd = open_regular(path)
    try:
        assert os.read(fd, 1) == b"{"
    finally:
        os.close(fd)


def test_a_fifo_and_a_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file \\(a named pipe\\)"):
        read_bytes(fifo, 10, CheckpointError)
    with pytest.raises(ParameterError, match="not a regular file \\(a directory\\)"):
        read_bytes(tmp_path, 10, ParameterError)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FusionError, match=f"{tmp_path / 'absent'}: cannot read"):
        read_bytes(tmp_path / "absent", 10)


def test_the_size_limit_is_inclusive(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bytes(path, 10) == b"x" * 10
    with pytest.raises(FusionError, match="larger than 9 bytes"):
        read_bytes(path, 9)


def test_text_must_be_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ParameterError, match="not UTF-8 text \\(byte 7\\)"):
        read_text(path, 100, ParameterError)


def test_json_depth_skips_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert json_depth(b'"\\"[["') == 0
    assert json_depth(b"[]") == 1


def test_json_deeper_than_the_limit_is_refused_before_parsing():
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, "x") is not None
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    with pytest.raises(CheckpointError, match=f"x: JSON nested deeper than {MAX_DEPTH}"):
        parse_json(deep, "x", CheckpointError)
    with pytest.raises(FusionError, match="x: not valid JSON"):
        parse_json(b"{", "x")


def test_yaml_aliases_are_refused_anchors_alone_are_not(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yml"
    path.write_text("a: &x 1\nb: 2\n")
    assert load_yaml(path, ParameterError) == {"a": 1, "b": 2}
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ParameterError, match=str(path)):
        load_yaml(path, ParameterError)
    path.write_text("a: [1, 2\n")
    with pytest.raises(ParameterError, match="is not valid YAML"):
        load_yaml(path, ParameterError)
