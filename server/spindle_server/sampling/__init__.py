"""Per-request token selection on the shard: parameters, logits processing and sampling, stopping,
incremental detokenization."""

from spindle_server.sampling.detokenizer import IncrementalDetokenizer, decode_generated
from spindle_server.sampling.params import SamplingParams
from spindle_server.sampling.sampler import SampleOutput, sample
from spindle_server.sampling.stopping import FinishReason, StoppingCriteria

__all__ = [
    "FinishReason",
    "IncrementalDetokenizer",
    "SampleOutput",
    "SamplingParams",
    "StoppingCriteria",
    "decode_generated",
    "sample",
]
