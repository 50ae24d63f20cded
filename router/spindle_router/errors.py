"""The one error type of the API: an HTTP status, TGI's `error_type`, a message clients may parse.

Raised anywhere between reading the body and the end of a generation; the app's error middleware (or, inside
an SSE stream, the stream's error event) turns it into JSON. `metric` is the label of
`tgi_request_failure` when the failure counts as a failed generation.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str, metric: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.metric = metric

    @classmethod
    def overloaded(cls) -> ApiError:
        return cls(429, "overloaded", "Model is overloaded", "overloaded")

    @classmethod
    def generation(cls, detail: str) -> ApiError:
        return cls(424, "generation", f"Request failed during generation: {detail}", "generation")

    @classmethod
    def incomplete(cls, streaming: bool) -> ApiError:
        if streaming:
            return cls(500, "incomplete_generation_stream", "Incomplete generation stream", "incomplete")
        return cls(500, "incomplete_generation", "Incomplete generation", "incomplete")

    @classmethod
    def template(cls, detail: str) -> ApiError:
        return cls(422, "template_error", f"Template error: {detail}", "template")


class SchemaError(ApiError):
    """The JSON does not fit the request type (what serde rejects in TGI: wrong types, missing fields).
    Message "Failed to deserialize the JSON body into the target type: <field>: <reason>"."""

    def __init__(self, detail: str) -> None:
        super().__init__(422, "validation", f"Failed to deserialize the JSON body into the target type: {detail}")
        self.detail = detail


class ValidationError(ApiError):
    """TGI's parameter validation (`router/src/validation.rs`). Message "Input validation error: <detail>"."""

    def __init__(self, detail: str) -> None:
        super().__init__(422, "validation", f"Input validation error: {detail}", "validation")
        self.detail = detail
