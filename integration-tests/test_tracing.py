"""One trace across processes: a client's `traceparent` -> router spans -> every shard's RPC spans,
exported over OTLP/gRPC to a real receiver this test runs."""

from __future__ import annotations

import secrets

import requests

from tests.helpers.otlp_receiver import OtlpReceiver, ReceivedSpan

ROUTER_SPANS = {"POST /generate", "validation", "queue", "inference"}
SHARD_RPCS = {"Step"}


def _rank(span: ReceivedSpan) -> int | None:
    value = span.attributes.get("spindle.rank")
    return None if value is None else value.int_value


def _complete(trace_id: str, world_size: int, rpcs_per_rank: int):
    """Every router span, and `rpcs_per_rank` RPC spans from each rank (exporters send in batches)."""
    def check(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        per_rank = [sum(s.name in SHARD_RPCS and _rank(s) == r for s in mine) for r in range(world_size)]
        return ROUTER_SPANS <= {s.name for s in mine} and min(per_rank) >= rpcs_per_rank
    return check


def test_traceparent_yields_one_tree_over_router_and_every_shard(start_launcher, tiny_model_dir):
    trace_id, client_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with OtlpReceiver() as receiver:
        # A short batch delay so spans arrive while the stack runs; the stack's exit flushes the rest.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
        with start_launcher(tiny_model_dir, num_shard=2, env=env,
                            args=["--otlp-endpoint", receiver.endpoint, "--otlp-service-name", "it.router"]) as stack:
            r = requests.post(
                f"{stack.base_url}/generate", timeout=60,
                json={"inputs": "hello world", "parameters": {"max_new_tokens": 4, "details": True}},
                headers={"traceparent": f"00-{trace_id}-{client_span_id}-01", "x-request-id": "it-trace-1"},
            )
            assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 4
            assert r.headers.get("x-request-id") == "it-trace-1"
            spans = receiver.wait_for(_complete(trace_id, 2, rpcs_per_rank=4), timeout_s=30)
            log = stack.log_text()
        # The router traced the POST only (not the launcher's /health probes), all inside the client's trace.
        assert {s.trace_id for s in spans if s.service == "it.router"} == {trace_id}
        mine = [s for s in spans if s.trace_id == trace_id]
        assert _complete(trace_id, 2, rpcs_per_rank=4)(spans), sorted((s.service, s.name, _rank(s)) for s in spans)

        by_id = {s.span_id: s for s in mine}
        root = [s for s in mine if s.name == "POST /generate"]
        assert len(root) == 1 and root[0].parent_span_id == client_span_id and root[0].service == "it.router"
        for s in mine:
            if s is not root[0]:
                assert s.parent_span_id in by_id, f"{s.name} ({s.service}) has a parent nobody exported"
        for name in ("validation", "queue", "inference"):
            (child,) = [s for s in mine if s.name == name]
            assert child.parent_span_id == root[0].span_id, name
        inference = next(s for s in mine if s.name == "inference")
        shard_spans = [s for s in mine if s.name in SHARD_RPCS]
        assert {s.service for s in shard_spans} == {"it.shard"}
        for s in shard_spans:
            assert s.parent_span_id == inference.span_id, (s.name, _rank(s))
        # Four steps (4 tokens: a prefill, three decodes), on each of the two ranks.
        for rank in (0, 1):
            names = sorted(s.name for s in shard_spans if _rank(s) == rank)
            assert names == ["Step"] * 4, (rank, names)
        # The request's log line carries its id and trace id.
        success = [line for line in log.splitlines() if "Success" in line and "request_id=it-trace-1" in line]
        assert success and f"trace_id={trace_id}" in success[0], log[-3000:]
