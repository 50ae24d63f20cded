"""The model's chat template: found in the model directory, rendered with sandboxed Jinja.

Sources, first found wins: `chat_template.jinja`, `chat_template.json` (`{"chat_template": ...}`),
`tokenizer_config.json` (`chat_template`). A template given as a list of `{name, template}` uses the entry
named `default`. Rendering follows transformers (trim/lstrip blocks, `raise_exception`, `strftime_now`) with
TGI's variables: `messages`, `bos_token`, `eos_token`, `add_generation_prompt`, `tools`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(Exception):
    """Rendering failed, or the model has no template: HTTP 422 `template_error`."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # transformers overrides Jinja's HTML-escaping tojson; templates expect plain JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def find_template_source(model_dir: str | Path) -> str | None:
    """The raw template text of the model in `model_dir`, or None when it has none."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            found = _pick_template(json.loads(path.read_text(encoding="utf-8")).get("chat_template"))
            if found is not None:
                return found
    return None


def _message_text(message: dict[str, Any]) -> str:
    """TGI flattens content chunks to text: text chunks joined, images as markdown `![](url)`."""
    content = message.get("content")
    if content is None and message.get("tool_calls") is not None:
        return json.dumps(message["tool_calls"])
    if isinstance(content, str):
        return content
    parts = []
    for chunk in content or []:
        if chunk.get("type") == "image_url":
            parts.append(f"![]({chunk.get('image_url', {}).get('url', '')})")
        else:
            parts.append(chunk.get("text", ""))
    return "".join(parts)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"cannot compile the chat template: {e}") from e
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, bos_token: str | None = None, eos_token: str | None = None
    ) -> ChatTemplate | None:
        source = find_template_source(model_dir)
        return None if source is None else cls(source, bos_token, eos_token)

    @property
    def uses_tools(self) -> bool:
        return "tools" in self.source

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt for `messages` (dicts already shape-checked). When the last message is the assistant's,
        the prompt stops right after its content so the model continues it (continue-final-message)."""
        flat = []
        for m in messages:
            item = {"role": m["role"], "content": _message_text(m)}
            for key in ("name", "tool_call_id", "tool_calls"):
                if m.get(key) is not None:
                    item[key] = m[key]
            flat.append(item)
        continue_final = bool(flat) and flat[-1]["role"] == "assistant"
        try:
            rendered = self._template.render(
                messages=flat,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                add_generation_prompt=not continue_final,
                tools=tools,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from e
        except Exception as e:  # templates can fail any way Python can (KeyError, TypeError...)
            raise TemplateError(f"{type(e).__name__}: {e}") from e
        if continue_final:
            final = flat[-1]["content"]
            for needle in (final, final.strip()):
                at = rendered.rfind(needle) if needle else -1
                if at >= 0:
                    return rendered[: at + len(needle)]
        return rendered
