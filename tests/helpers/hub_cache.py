"""A Hugging Face Hub cache laid out on disk by hand, so Hub ids resolve offline in tests (nothing downloads).

    <cache>/models--<owner>--<name>/refs/<branch or tag>     -> a commit hash
    <cache>/models--<owner>--<name>/snapshots/<commit>/...   -> the files at that commit
"""

from __future__ import annotations

import shutil
from pathlib import Path


def add_snapshot(cache: Path, repo_id: str, commit: str, files_from: Path, refs: tuple[str, ...] = ()) -> Path:
    """Copy the files of `files_from` in as `repo_id` at `commit` (40 hex digits), named by `refs`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def use_offline_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub at `cache` and keep it offline (its constants are read at import, so patch them)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
