"""Which model class serves a checkpoint, its config, and loading it onto this rank.

- read_model_config(dir) -> ModelConfig          config.json (+ generation_config.json for EOS ids)
- load_model(dir, dtype, device, dist, ops)      builds the model class for config.model_type, loads weights
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from spindle_kernels import KernelOps

from spindle_server.distributed import Distributed
from spindle_server.layers.rotary import RopeConfig

if TYPE_CHECKING:
    from spindle_server.models.causal_lm import CausalLM

log = logging.getLogger("spindle_server.models")


class WindowRule(enum.Enum):
    """Which layers slide when config.json lists no `layer_types` (transformers' rule per family)."""

    ALL = "all"  # Mistral, Phi-3: every layer
    FROM_MAX_WINDOW_LAYERS = "from_max_window_layers"  # Qwen2/3: layers >= max_window_layers, if use_sliding_window
    EVERY_SECOND = "every_second"  # Gemma 2: layers 0, 2, 4, ...
    PATTERN = "sliding_window_pattern"  # Gemma 3: all but every sliding_window_pattern-th layer (default 6)


@dataclass(frozen=True)
class ArchTraits:
    """What differs between the architectures sharing the decoder graph in llama.py, fixed per model_type.

    What a checkpoint's config.json sets (biases, windows, soft-capping, rope) is read into ModelConfig.
    """

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)
    gemma: bool = False  # Gemma: `1 + w` norms, sandwich norms, embeddings scaled by sqrt(hidden)
    fused_checkpoint: bool = False  # the checkpoint stores qkv_proj and gate_up_proj fused (Phi-3)
    window_layers: WindowRule = WindowRule.ALL
    hidden_act: str = "silu"


# model_type -> traits. Qwen2 always carries q/k/v biases; Llama reads `attention_bias` (on q/k/v/o).
_ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(),
    "mistral": ArchTraits(),
    "qwen2": ArchTraits(qkv_bias=True, window_layers=WindowRule.FROM_MAX_WINDOW_LAYERS),
    "qwen3": ArchTraits(qk_norm=True, window_layers=WindowRule.FROM_MAX_WINDOW_LAYERS),
    "gemma2": ArchTraits(gemma=True, window_layers=WindowRule.EVERY_SECOND, hidden_act="gelu_pytorch_tanh"),
    "gemma3_text": ArchTraits(
        gemma=True, qk_norm=True, window_layers=WindowRule.PATTERN, hidden_act="gelu_pytorch_tanh"
    ),
    "phi3": ArchTraits(fused_checkpoint=True),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHITECTURES))
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only model's shape and the features its layers apply. Head counts are totals over all ranks."""

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
    # Sliding window per layer (a query sees its last `window` positions), None = full attention; () = all full.
    layer_windows: tuple[int | None, ...] = ()
    traits: ArchTraits = field(default_factory=ArchTraits)
    # Attention logit scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5).
    attn_scale: float | None = None
    attn_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: the same on the logits
    local_rope: RopeConfig | None = None  # the rope of sliding layers when it differs (Gemma 3)

    @property
    def sliding_window(self) -> int | None:
        """The widest window of any layer (None when every layer attends fully)."""
        windows = [w for w in self.layer_windows if w is not None]
        return max(windows) if windows else None

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def rope_of(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.window_of(layer) is not None else self.rope

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
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{len(self.layer_windows)} layer windows for {self.num_layers} layers")
        for window in self.layer_windows:
            if window is not None and window < 1:
                raise ValueError(f"sliding window must be a positive token count, got {window}")

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


def _layer_windows(cfg: dict[str, Any], traits: ArchTraits, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window, as transformers derives it; a layer type we cannot apply is an error."""
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    if traits.window_layers is WindowRule.FROM_MAX_WINDOW_LAYERS and not cfg.get("use_sliding_window", False):
        window = None  # transformers drops the window of Qwen2/3 unless use_sliding_window
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if window is None:
            return ()
        rule = traits.window_layers
        if rule is WindowRule.ALL:
            sliding = [True] * num_layers
        elif rule is WindowRule.FROM_MAX_WINDOW_LAYERS:
            first = int(cfg.get("max_window_layers", num_layers))
            sliding = [i >= first for i in range(num_layers)]
        elif rule is WindowRule.EVERY_SECOND:
            sliding = [i % 2 == 0 for i in range(num_layers)]
        else:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    else:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ValueError(f"layer_types must list one type per layer ({num_layers}), got {layer_types!r}")
        unknown = sorted({t for t in layer_types if t not in _LAYER_TYPES})
        if unknown:
            raise ValueError(f"attention layer types {unknown} are not supported (supported: {list(_LAYER_TYPES)})")
        sliding = [t == "sliding_attention" for t in layer_types]
        if any(sliding) and window is None:
            raise ValueError("layer_types names sliding_attention layers but sliding_window is not set")
    if window is None or not any(sliding):
        return ()
    return tuple(window if s else None for s in sliding)


def _rope_configs(cfg: dict[str, Any], traits: ArchTraits) -> tuple[RopeConfig, RopeConfig | None]:
    """(rope of full-attention layers, rope of sliding layers or None when the same)."""
    if cfg.get("model_type") == "phi3":  # transformers reads its rope types "yarn" and "su" as longrope
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) in ("yarn", "su"):
            cfg = {**cfg, "rope_parameters": {**params, "rope_type": "longrope"}, "rope_scaling": None}
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # transformers 5 writes per-layer-type rope parameters (Gemma 3: a local base for sliding layers)
        unknown = sorted(set(params) - set(_LAYER_TYPES))
        if unknown:
            raise ValueError(f"rope parameters for layer types {unknown} are not supported")
        full = RopeConfig.from_hf_config({**cfg, "rope_parameters": params.get("full_attention", {})})
        local_params = params.get("sliding_attention")
        local = RopeConfig.from_hf_config({**cfg, "rope_parameters": local_params}) if local_params else None
        return full, local
    full = RopeConfig.from_hf_config(cfg)
    if "rope_local_base_freq" in cfg:  # Gemma 3 written by transformers 4
        return full, RopeConfig(theta=float(cfg["rope_local_base_freq"]))
    if traits.window_layers is WindowRule.PATTERN:
        # transformers' Gemma 3 defaults: the sliding layers' rope base is 10000 unless given
        return full, RopeConfig(theta=10000.0)
    return full, None


def _optional_float(cfg: dict[str, Any], name: str) -> float | None:
    value = cfg.get(name)
    return None if value is None else float(value)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `config.json` (and `generation_config.json`, whose EOS ids are added) in `model_dir`.

    An architecture, activation, rope type or attention layer type Spindle cannot serve exactly raises
    ValueError naming it (never a warning and different tokens).
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    traits = _ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if traits is None:
        architectures = cfg.get("architectures") or []
        raise ValueError(
            f"model_type {model_type!r} is not supported ({', '.join(architectures) or 'no architectures listed'}); "
            f"Spindle serves: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden_act = cfg.get("hidden_activation") or cfg.get("hidden_act") or traits.hidden_act
    if hidden_act != traits.hidden_act:
        raise ValueError(
            f"hidden_act {hidden_act!r} is not supported for {model_type} (its MLP uses {traits.hidden_act!r})"
        )
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported (Spindle's attention is causal)")
    gen_path = model_dir / "generation_config.json"
    gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden_size = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden_size // num_heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        rope, local_rope = _rope_configs(cfg, traits)
        query_scalar = cfg.get("query_pre_attn_scalar") if traits.gemma else None
        return ModelConfig(
            model_type=model_type,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id"), gen_eos),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", traits.gemma)),
            qkv_bias=traits.qkv_bias or attention_bias,
            o_bias=traits.o_bias or attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_windows=_layer_windows(cfg, traits, num_layers),
            traits=traits,
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else None,
            attn_softcap=_optional_float(cfg, "attn_logit_softcapping") if traits.gemma else None,
            final_logit_softcap=_optional_float(cfg, "final_logit_softcapping") if traits.gemma else None,
            local_rope=local_rope,
        )
    except KeyError as exc:
        raise ValueError(f"{path} lacks the field {exc.args[0]!r}") from None


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
