"""Spindle router: HTTP API, validation, scheduling and the shard client. Never imports torch."""

__version__ = "0.1.0"
