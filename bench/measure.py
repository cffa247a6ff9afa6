"""Wall time and peak RSS of a command, measured in a wrapper process that runs only that command
(so RUSAGE_CHILDREN's maximum is the command's own)."""

from __future__ import annotations

import json
import subprocess
import sys

_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "seconds": seconds, "peak_rss": peak_kib * 1024,
                  "stderr": done.stderr[-2000:]}))
"""


def measure(command: list[str], env: dict[str, str] | None = None, cwd=None) -> dict:
    """``{"seconds", "peak_rss" (bytes)}`` of ``command`` (in ``env`` and ``cwd``, default
    ours); raises if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *map(str, command)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=cwd,
    )
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{command[:4]} failed: {result['stderr']}")
    return result


def merge_command(base, tuned, out, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusion_kernels.merge",
        "--base",
        base,
        "--tuned",
        tuned,
        "--out",
        out,
        "--overwrite",
        "--quiet",
        *flags,
    ]
