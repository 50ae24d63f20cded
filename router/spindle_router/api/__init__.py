"""HTTP API: TGI's native routes and the OpenAI-compatible ones, over an `Infer` layer."""

from spindle_router.api.app import build_app

__all__ = ["build_app"]
