"""Where a shard's model lives: a local directory as given, or a Hub id resolved through huggingface_hub.

A Hub id is looked up in the local Hugging Face cache (and on the Hub when there is network and
HF_HUB_OFFLINE is not set) at `revision` (a branch, tag or commit; None = the default branch). The launcher
resolves the id first and hands its shards the commit it got, so every shard loads the snapshot the router
read its tokenizer from.
"""

from __future__ import annotations

from pathlib import Path

# What serving reads: config, generation config, weights, tokenizer files, chat templates.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def resolve_model(model: str, revision: str | None = None) -> Path:
    """The directory holding `model` (a local directory or a Hub id at `revision`).

    Raises ValueError naming what failed: a revision given with a local directory (it cannot be honoured),
    an id that is neither a directory nor resolvable on the Hub or in its cache.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision!r} applies to Hub ids; {model!r} is a local directory")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r}: no such directory (and not a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as exc:  # the hub raises a dozen types for offline / missing / gated / bad revision
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"model {model!r}{at}: not a local directory and not resolvable on the Hub ({exc})") from exc
