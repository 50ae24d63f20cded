"""Prometheus metrics with TGI's names (so TGI's Grafana dashboard works) plus Spindle's own.

One `Metrics` object per router process, holding its own registry (tests can build several).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

# TGI: 35 geometric buckets 0.00015 s x 1.5^k for every *_duration metric.
GRAMMAR_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
DURATION_BUCKETS = tuple(0.00015 * 1.5**k for k in range(35))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _linear(top: int, n: int = 100) -> tuple[float, ...]:
    step = max(top / n, 1.0)
    return tuple(step * (i + 1) for i in range(n))


@dataclass
class Metrics:
    max_input_tokens: int = 4096
    max_total_tokens: int = 8192
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that finished", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=r)
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end request seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_validation_duration = Histogram(
            "tgi_request_validation_duration", "Validation seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration", "Queue seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration", "Inference seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_mean_time_per_token_duration = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", buckets=_linear(self.max_input_tokens), registry=r
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", buckets=_linear(self.max_total_tokens), registry=r
        )
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Requested max_new_tokens", buckets=_linear(self.max_total_tokens), registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV tokens held by the running batch", registry=r
        )
        self.batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens", "KV tokens the shards hold", registry=r)
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Requests admitted per step", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_concat = Counter("tgi_batch_concat", "Batches merged", ["reason"], registry=r)
        self.batch_inference_count = Counter("tgi_batch_inference_count", "Shard calls", ["method"], registry=r)
        self.batch_inference_success = Counter(
            "tgi_batch_inference_success", "Shard calls that succeeded", ["method"], registry=r
        )
        self.batch_inference_failure = Counter(
            "tgi_batch_inference_failure", "Shard calls that failed", ["method"], registry=r
        )
        for name in ("inference", "forward", "decode", "filter", "concat"):
            setattr(
                self,
                f"batch_{name}_duration",
                Histogram(
                    f"tgi_batch_{name}_duration",
                    f"Shard {name} seconds",
                    ["method"],
                    buckets=DURATION_BUCKETS,
                    registry=r,
                ),
            )
        self.kv_blocks_total = Gauge("spindle_kv_blocks_total", "KV blocks the shards hold", registry=r)
        self.kv_blocks_used = Gauge(
            "spindle_kv_blocks_used", "KV blocks held by waiting or running requests", registry=r
        )
        self.prefix_cache_blocks = Gauge(
            "spindle_prefix_cache_blocks", "KV blocks held by the prefix cache (in use or evictable)", registry=r
        )
        self.prefix_cache_hit_ratio = Gauge(
            "spindle_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache / prompt tokens", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "spindle_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.prefix_cache_prompt_tokens = Counter(
            "spindle_prefix_cache_prompt_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.preemptions = Counter("spindle_preemptions", "Requests preempted for KV space", registry=r)
        # Where a scheduler step's time goes on the router: planning it, building its message, the call
        # (serialization, RPC and the shards' own time, which tgi_batch_inference_duration has), and
        # turning the answer into events.
        self.step_phase_duration = Histogram(
            "spindle_step_phase_duration", "Seconds of a scheduler step, by phase: plan, build, call, absorb",
            ["phase"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.grammar_compile_duration = Histogram(
            "spindle_grammar_compile_duration",
            "Seconds a Prefill spent compiling grammars (compiled grammars are cached by grammar on the shard)",
            buckets=GRAMMAR_BUCKETS, registry=r,
        )
        self.grammar_mask_duration = Histogram(
            "spindle_grammar_mask_duration",
            "Seconds a step spent computing token masks (on a worker thread, overlapping the forward)",
            buckets=GRAMMAR_BUCKETS, registry=r,
        )

    def exposition(self) -> bytes:
        """Prometheus text format with TGI's sample names.

        prometheus_client would write counters as `<name>_total` plus a `<name>_created` gauge; TGI (and
        its Grafana dashboard) use the bare name, which the text format allows for counters.
        """
        lines = []
        for family in self.registry.collect():
            lines.append(f"# HELP {family.name} {_escape(family.documentation)}")
            lines.append(f"# TYPE {family.name} {family.type}")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                name = family.name if sample.name == f"{family.name}_total" else sample.name
                labels = ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in sample.labels.items())
                lines.append(f"{name}{{{labels}}} {floatToGoString(sample.value)}" if labels
                             else f"{name} {floatToGoString(sample.value)}")
        return ("\n".join(lines) + "\n").encode()


def _escape(text: str, quote: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text
