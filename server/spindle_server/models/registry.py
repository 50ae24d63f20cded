"""Which model class serves a checkpoint, its config, and loading it onto this rank.

- read_model_config(dir) -> ModelConfig          config.json (+ generation_config.json for EOS ids)
- load_model(dir, dtype, device, dist, ops)      builds the model class for config.model_type, loads weights
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from spindle_kernels import KernelOps

from spindle_server.distributed import Distributed
from spindle_server.layers.moe import MoeConfig
from spindle_server.layers.rotary import RopeConfig

if TYPE_CHECKING:
    from spindle_server.models.causal_lm import CausalLM

log = logging.getLogger("spindle_server.models")


@dataclass(frozen=True)
class ArchTraits:
    """What differs between Llama-family architectures sharing one graph."""

    qkv_bias: bool = False
    o_bias: bool = False


# model_type -> traits. Qwen2 always carries q/k/v biases; Llama reads `attention_bias` (on q/k/v/o);
# Qwen2-MoE reads `qkv_bias` (default true). The sparse ones also read a MoeConfig (layers/moe.py).
_ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(),
    "mistral": ArchTraits(),
    "qwen2": ArchTraits(qkv_bias=True),
    "mixtral": ArchTraits(),
    "qwen2_moe": ArchTraits(qkv_bias=True),
}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family model's shape. Head counts are totals over all ranks."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Mistral-style sliding window, read but NOT applied: attention is always full (exact for prompts
    # shorter than the window; longer contexts diverge from the reference).
    sliding_window: int | None = None
    moe: MoeConfig | None = None  # the experts of a sparse model (Mixtral, Qwen2-MoE); None when dense

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "intermediate_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError unless the heads split evenly over `world_size` ranks."""
        if self.num_heads % world_size or self.num_kv_heads % world_size:
            raise ValueError(
                f"cannot shard {self.model_type}: num_heads={self.num_heads} and num_kv_heads="
                f"{self.num_kv_heads} must both be divisible by the world size {world_size} "
                "(fewer KV heads than ranks is not supported)"
            )
        if self.intermediate_size % world_size:
            raise ValueError(
                f"cannot shard {self.model_type}: intermediate_size={self.intermediate_size} "
                f"is not divisible by the world size {world_size}"
            )
        if self.moe is not None:
            self.moe.check_world_size(world_size)

    def kv_heads_per_rank(self, world_size: int) -> int:
        self.check_world_size(world_size)
        return self.num_kv_heads // world_size


def _eos_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return tuple(ids)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `config.json` (and `generation_config.json`, whose EOS ids are added) in `model_dir`."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    traits = _ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if traits is None:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"hidden_act {cfg['hidden_act']!r} is not supported (Llama-family models use 'silu')"
        )
    gen_path = model_dir / "generation_config.json"
    gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden_size = int(cfg["hidden_size"])
        attention_bias = bool(cfg.get("attention_bias", False))
        return ModelConfig(
            model_type=model_type,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden_size // num_heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id"), gen_eos),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf_config(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("qkv_bias", traits.qkv_bias)) or attention_bias,
            o_bias=traits.o_bias or attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            moe=MoeConfig.from_hf_config(cfg, model_type),
        )
    except KeyError as exc:
        raise ValueError(f"{path} lacks the field {exc.args[0]!r}") from None


def _window_applies(config: ModelConfig) -> bool:
    return bool(config.sliding_window) and config.sliding_window < config.max_position_embeddings  # type: ignore[operator]


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    dist: Distributed,
    ops: KernelOps,
    pack: bool = True,
) -> CausalLM:
    """This rank's slice of the model in `model_dir`, weights loaded, in eval mode. Logs progress.

    `pack`: on CPU, reorder the linear weights for oneDNN (layers/linear.py); no effect elsewhere.

    Raises ValueError (before reading any weight) when the heads do not split over dist.world_size.
    """
    from spindle_server.layers.linear import pack_linear_weights
    from spindle_server.models.llama import LlamaForCausalLM  # the only architecture class so far
    from spindle_server.weights import Weights

    config = read_model_config(model_dir)
    config.check_world_size(dist.world_size)
    if config.moe is not None and _window_applies(config):
        raise ValueError(
            f"{config.model_type}: sliding_window={config.sliding_window} (shorter than max_position_embeddings="
            f"{config.max_position_embeddings}) is not supported for mixture-of-experts models yet"
        )
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        log.warning(
            "sliding_window=%d is not applied (attention is always full): outputs differ from the "
            "reference for contexts longer than the window",
            config.sliding_window,
        )
    started = time.monotonic()
    log.info(
        "rank %d/%d: loading %s (%d layers, hidden %d) from %s as %s",
        dist.rank,
        dist.world_size,
        config.model_type,
        config.num_layers,
        config.hidden_size,
        model_dir,
        dtype,
    )
    model = LlamaForCausalLM(config, dist, ops, dtype=dtype, device=device)
    weights = Weights(model_dir, dtype=dtype, device=device)
    model.load(weights)
    weights.close()
    model.eval()
    packed = pack_linear_weights(model) if pack else 0
    log.info("rank %d/%d: model loaded in %.1fs%s", dist.rank, dist.world_size, time.monotonic() - started,
             f" ({packed} weights packed for oneDNN)" if packed else "")
    return model
