"""Model resolution in the shard: local directories as given, Hub ids at a revision from an offline cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from spindle_server.hub import resolve_model

from tests.helpers.hub_cache import add_snapshot, use_offline_cache

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/tiny", MAIN, src, refs=("main",))
    add_snapshot(cache, "org/tiny", V1, src, refs=("v1",))
    use_offline_cache(monkeypatch, cache)
    return cache


def test_hub_id_resolves_at_its_revision(hub: Path) -> None:
    assert resolve_model("org/tiny").name == MAIN  # the default branch
    assert resolve_model("org/tiny", "v1").name == V1  # a tag
    assert resolve_model("org/tiny", MAIN).name == MAIN  # a commit
    with pytest.raises(ValueError, match=r"model 'org/tiny' at revision 'v2': not a local directory"):
        resolve_model("org/tiny", "v2")


def test_local_directory_takes_no_revision(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="--revision 'v1' applies to Hub ids"):
        resolve_model(str(tmp_path), "v1")
    with pytest.raises(ValueError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))


REPO_FILES = [
    "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "special_tokens_map.json",
    "pytorch_model.bin", "original/consolidated.00.pth", "README.md", "onnx/model.onnx",
]


@pytest.mark.parametrize("side", ["shard", "launcher"])
def test_hub_downloads_what_serving_reads_and_no_more(side: str) -> None:
    from huggingface_hub.utils import filter_repo_objects

    if side == "shard":
        from spindle_server.hub import MODEL_FILE_PATTERNS as patterns
    else:
        from spindle_router.launcher import HUB_FILE_PATTERNS as patterns
    fetched = set(filter_repo_objects(REPO_FILES, allow_patterns=patterns))
    assert fetched == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "special_tokens_map.json",
    }
