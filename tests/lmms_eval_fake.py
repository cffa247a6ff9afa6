"""A stand-in for lmms-eval's command line, for tests that need no lmms-eval installed: a package
``lmms_eval`` whose ``python -m lmms_eval`` takes the arguments the scorer passes, records them,
and writes a results file where and as lmms-eval writes one (``OUT/<last two parts of the model
path joined by "__">/<timestamp>_results.json``), and whose ``lmms_eval.tasks.TaskManager`` lists
its tasks. Run through :func:`fake_python`, an interpreter that finds the package first.

The score of a model is a digest of its weight files (:func:`fake_score`): merged models that
differ get different scores. The task :data:`FAIL_TASK` fails the way lmms-eval fails: one error
line logged, exit status 0, no results file."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

TASK = "fk_fake_vqa"
FAIL_TASK = "fk_fake_fail"
ERROR = (
    "Error during evaluation: fake failure. Please set `--verbosity=DEBUG` to get more information."
)

_TASKS = f'''
from pathlib import Path


class TaskManager:
    def __init__(self, verbosity="INFO", include_path=None, include_defaults=True, model_name=None):
        found = ["{TASK}", "{FAIL_TASK}"]
        for config in sorted(Path(include_path).glob("*.yaml")) if include_path else []:
            found += [line.split(":", 1)[1].strip() for line in config.read_text().splitlines()
                      if line.startswith("task:")]
        self.all_tasks = sorted(found)
'''

_MAIN = f'''
import argparse, hashlib, json, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
for name in ("model", "model_args", "tasks", "batch_size", "device", "output_path",
             "include_path", "limit"):
    parser.add_argument("--" + name)
parser.add_argument("--force_simple", action="store_true")
args = parser.parse_args()
with (Path(__file__).parent / "calls.jsonl").open("a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
tasks = args.tasks.split(",")
if "{FAIL_TASK}" in tasks:
    print("loading the model")
    print("2026-01-01 00:00:00 | ERROR    | lmms_eval.__main__:cli_evaluate:614 - {ERROR}")
    sys.exit(0)
pretrained = dict(item.split("=", 1) for item in args.model_args.split(","))["pretrained"]
digest = hashlib.sha256()
for weights in sorted(Path(pretrained).glob("*.safetensors")):
    digest.update(weights.read_bytes())
score = int(digest.hexdigest()[:8], 16) / 16**8
folder = Path(args.output_path) / "__".join(Path(pretrained).parts[-2:])
folder.mkdir(parents=True)
results = {{
    "results": {{t: {{"alias": t, "exact_match,none": score, "exact_match_stderr,none": "N/A"}}
                for t in tasks}},
    "configs": {{t: {{"metric_list": [{{"metric": "exact_match"}}]}} for t in tasks}},
    "higher_is_better": {{t: {{"exact_match": True}} for t in tasks}},
}}
stamp = time.strftime("%Y%m%d_%H%M%S")
(folder / (stamp + "_results.json")).write_text(json.dumps(results))
'''


def fake_python(directory: Path) -> Path:
    """Write the fake package into ``directory`` and return an interpreter that imports it."""
    package = directory / "lmms_eval"
    (package / "tasks").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "tasks" / "__init__.py").write_text(_TASKS)
    (package / "__main__.py").write_text(_MAIN)
    python = directory / "python"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="{directory}${{PYTHONPATH:+:$PYTHONPATH}}" '
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    return python


def fake_calls(python: Path) -> list[list[str]]:
    """The argument lists the fake was run with, in order."""
    calls = python.parent / "lmms_eval" / "calls.jsonl"
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def fake_score(model_dir: Path) -> float:
    """The score the fake gives ``model_dir``."""
    digest = hashlib.sha256()
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return int(digest.hexdigest()[:8], 16) / 16**8
