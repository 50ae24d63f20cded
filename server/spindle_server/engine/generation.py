"""What one step reports per request (domain side of the proto `Generation`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spindle_proto import generate_pb2

from spindle_server.sampling.stopping import FinishReason


@dataclass
class TokenList:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # NaN where unknown
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)

    def to_proto(self) -> generate_pb2.Tokens:
        return generate_pb2.Tokens(
            ids=self.ids, logprobs=self.logprobs, texts=self.texts, is_special=self.is_special
        )


@dataclass
class FinishedText:
    text: str  # every generated token decoded, special tokens skipped
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None  # set when the request sampled

    def to_proto(self) -> generate_pb2.GeneratedText:
        pb = generate_pb2.GeneratedText(
            text=self.text, generated_tokens=self.generated_tokens, finish_reason=int(self.finish_reason)
        )
        if self.seed is not None:
            pb.seed = self.seed
        return pb


@dataclass
class Generation:
    request_id: int
    tokens: TokenList  # the token generated this step
    prefill_tokens: TokenList | None = None  # prompt log-probs, on the step that completed the prompt
    top_tokens: list[TokenList] = field(default_factory=list)  # alternatives, one list per generated token
    generated_text: FinishedText | None = None  # set when the request finished this step

    def to_proto(self) -> generate_pb2.Generation:
        pb = generate_pb2.Generation(
            request_id=self.request_id,
            tokens=self.tokens.to_proto(),
            top_tokens=[t.to_proto() for t in self.top_tokens],
        )
        if self.prefill_tokens is not None:
            pb.prefill_tokens.CopyFrom(self.prefill_tokens.to_proto())
        if self.generated_text is not None:
            pb.generated_text.CopyFrom(self.generated_text.to_proto())
        return pb
