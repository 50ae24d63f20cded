"""text-generation-launcher flags that Spindle does not implement: known, so a TGI command line never fails
with a bare usage line, and never silently different.

Each flag (and its UPPER_SNAKE environment variable) is either
* REFUSED: set to anything Spindle cannot honour, the launcher exits with the reason before starting
  anything ("--quantize gptq: quantization gptq is not supported"), or
* NO_EFFECT: accepted, with one logged line saying why it changes nothing here.
The flags Spindle implements are in flags.FLAGS; `--help` shows all three kinds in their own groups.
"""

from __future__ import annotations

import argparse
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spindle_router.flags import Flag, Scope, env_name, env_value, non_negative_int, parse_bool

log = logging.getLogger("spindle_launcher")


class Status(enum.Enum):
    REFUSED = "refused"
    NO_EFFECT = "accepted without effect"


@dataclass(frozen=True)
class CompatFlag:
    name: str
    status: Status
    reason: str  # why it is refused / why it changes nothing
    cast: Callable[[str], Any] = str
    switch: bool = False  # a bare `--name` means true (TGI's clap bools)
    allowed: Callable[[Any], bool] | None = None  # REFUSED flags: values that are fine after all (no log line)
    choices: tuple[str, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """The refusal for `value`, or None when it is accepted."""
        if self.status is Status.REFUSED and not (self.allowed and self.allowed(value)):
            return f"--{self.name} {value}: {self.reason}"
        return None


_QUANTIZE = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4",
             "bitsandbytes-fp4", "fp8")

TGI_COMPAT_FLAGS: tuple[CompatFlag, ...] = (
    CompatFlag("quantize", Status.REFUSED, "quantization {value} is not supported", choices=_QUANTIZE),
    CompatFlag("speculate", Status.REFUSED, "speculative decoding is not supported", cast=non_negative_int,
               allowed=lambda v: v == 0),
    CompatFlag("kv-cache-dtype", Status.REFUSED,
               "KV cache dtype {value} is not supported: the KV cache uses --dtype", choices=("fp8_e4m3fn", "fp8_e5m2")),
    CompatFlag("lora-adapters", Status.REFUSED, "LoRA adapters are not supported yet"),
    CompatFlag("rope-scaling", Status.REFUSED,
               "overriding RoPE scaling is not supported: the model's config.json rope_scaling is used",
               choices=("linear", "dynamic")),
    CompatFlag("rope-factor", Status.REFUSED,
               "overriding RoPE scaling is not supported: the model's config.json rope_scaling is used", cast=float),
    CompatFlag("weights-cache-override", Status.REFUSED,
               "not supported: pass the directory holding the weights as --model-id"),
    CompatFlag("tokenizer-config-path", Status.REFUSED,
               "not supported: tokenizer_config.json is read from the model directory"),
    CompatFlag("prometheus-port", Status.REFUSED,
               "not supported: Spindle serves /metrics on --port; drop the flag and scrape /metrics there",
               cast=int),
    CompatFlag("ngrok", Status.REFUSED, "ngrok tunnels are not supported", switch=True, allowed=lambda v: not v),
    CompatFlag("ngrok-authtoken", Status.REFUSED, "ngrok tunnels are not supported"),
    CompatFlag("ngrok-edge", Status.REFUSED, "ngrok tunnels are not supported"),
    CompatFlag("trust-remote-code", Status.NO_EFFECT,
               "Spindle runs only its own model implementations, never code from the model repository", switch=True),
    CompatFlag("max-waiting-tokens", Status.NO_EFFECT,
               "with chunked prefill a waiting request is admitted every step it fits, so nothing waits on a "
               "count of decode steps", cast=non_negative_int),
    CompatFlag("disable-custom-kernels", Status.NO_EFFECT,
               "Spindle picks its kernels per device at start-up; there are no optional custom kernels", switch=True),
    CompatFlag("watermark-gamma", Status.NO_EFFECT,
               "watermarking is not supported: requests asking for it get 422", cast=float),
    CompatFlag("watermark-delta", Status.NO_EFFECT,
               "watermarking is not supported: requests asking for it get 422", cast=float),
    CompatFlag("enable-prefill-logprobs", Status.NO_EFFECT,
               "prompt logprobs (decoder_input_details) are always available", switch=True),
    CompatFlag("usage-stats", Status.NO_EFFECT, "Spindle never sends usage statistics anywhere",
               choices=("on", "off", "no-stack")),
)


def _as_flag(c: CompatFlag) -> Flag:
    return Flag(c.name, c.cast, False if c.switch else None, c.reason, "", Scope.LAUNCHER)


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    """The TGI flags in two help groups: refused (with what is refused) and accepted without effect."""
    groups = {
        Status.REFUSED: parser.add_argument_group(
            "TGI flags Spindle refuses", "known text-generation-launcher flags; set, the launcher exits with the "
            "reason before starting anything"),
        Status.NO_EFFECT: parser.add_argument_group(
            "TGI flags accepted without effect", "known text-generation-launcher flags; set, the launcher logs one "
            "line saying why they change nothing here"),
    }
    for c in TGI_COMPAT_FLAGS:
        kw: dict[str, Any] = {"metavar": "BOOL", "nargs": "?", "const": True, "type": parse_bool} if c.switch else {
            "type": c.cast}
        if c.choices:
            kw["choices"] = c.choices
        reason = c.reason.replace("{value}", "<value>")
        groups[c.status].add_argument(f"--{c.name}", default=env_value(_as_flag(c)),
                                      help=f"{reason} [env {env_name(c.name)}]".replace("%", "%%"), **kw)


def check_compat_flags(ns: argparse.Namespace) -> None:
    """Raise ValueError for a refused TGI flag that is set; log one line per accepted one that is set."""
    for c in TGI_COMPAT_FLAGS:
        value = getattr(ns, c.name.replace("-", "_"))
        if value is None or value is False:
            continue
        problem = c.problem(value)
        if problem is not None:
            raise ValueError(problem.replace("{value}", str(value)))
        if c.status is Status.NO_EFFECT:
            log.info("--%s %s has no effect here: %s", c.name, value, c.reason)
