"""Shared benchmark fixtures: generated checkpoint pairs, cached across runs in .bench_data/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fusion_kernels.demo import PairSpec, generate_pair

DATA = Path(__file__).parent.parent / ".bench_data"


def cached_pair(name: str, spec: PairSpec) -> tuple[Path, Path]:
    """Generate (once) and return the base and tuned directories of a pair."""
    root = DATA / name
    if not (root / "pair_spec.json").exists():
        generate_pair(root, spec)
    return root / "base", root / "tuned"


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    DATA.mkdir(exist_ok=True)
    return DATA
