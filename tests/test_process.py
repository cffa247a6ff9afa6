"""The exit contract every command shares (process.run_cli)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusion_kernels.errors import FusionError
from fusion_kernels.process import run_cli


def test_statuses_and_messages(capsys):
    def ok(argv):
        return 3 if argv == ["three"] else 0

    def bad(argv):
        raise FusionError("model.safetensors: tensor 'w' is broken; fix it")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(ok, ["three"], exit=False) == 3
    assert run_cli(bad, [], exit=False) == 2
    assert capsys.readouterr().err == "error: model.safetensors: tensor 'w' is broken; fix it\n"
    assert run_cli(interrupted, [], interrupted="stopped", exit=False) == 130
    assert capsys.readouterr().err == "stopped\n"


def test_argparse_exits_pass_through_in_process():
    def usage(argv):
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        run_cli(usage, [], exit=False)


@pytest.mark.parametrize(
    "body,status,stderr",
    [
        ("return 0", 0, ""),
        ("raise FusionError('bad input')", 2, "error: bad input\n"),
        (
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
            130,
            "interrupted: no output written\n",
        ),
        ("raise SystemExit('usage: nope')", 1, "usage: nope\n"),
    ],
    ids=["ok", "fusion-error", "sigterm", "system-exit"],
)
def test_a_process_ends_with_the_status_and_one_line(body, status, stderr):
    code = f"""
import atexit, os, signal, sys, time
from fusion_kernels.errors import FusionError
from fusion_kernels.process import run_cli
atexit.register(lambda: print("atexit ran"))

def command(argv):
    print("out", end="")
    {body}

run_cli(command)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (status, stderr)
    assert done.stdout == "outatexit ran\n", "stdout is flushed and atexit callbacks run"


def test_a_workspace_left_by_an_interrupt_is_removed_when_the_command_ends(tmp_path, capsys):
    from fusion_kernels.io.outputs import create_workspace, live_workspaces

    def interrupted_between_calls(argv):
        # As a Ctrl-C that lands after the writer's handlers, before abort() runs.
        create_workspace(tmp_path / "out")
        raise KeyboardInterrupt

    assert run_cli(interrupted_between_calls, [], exit=False) == 130
    assert list(tmp_path.iterdir()) == [] and live_workspaces() == []
