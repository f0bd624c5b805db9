"""Prometheus metrics of one server (its own registry), fed by the scheduler as its observer."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters, histograms and gauges under the `gptexport_` prefix.

    Args:
        service: gives `queue_depth`, `running` and `slots` for the gauges (read at scrape time).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptexport_requests", "Finished requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("gptexport_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("gptexport_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gptexport_time_to_first_token_seconds", "Submission to first token, per sequence",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptexport_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("gptexport_queue_time_seconds", "Submission to a slot, per sequence",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.occupancy = Histogram("gptexport_batch_occupancy", "Running sequences in each decode step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.drafted = Counter("gptexport_speculative_draft_tokens", "Prompt-lookup drafts checked", registry=r)
        self.accepted = Counter("gptexport_speculative_accepted_tokens", "Prompt-lookup drafts accepted",
                                registry=r)
        Gauge("gptexport_queue_depth", "Sequences waiting for a slot", registry=r).set_function(
            lambda: service.queue_depth)
        Gauge("gptexport_running_sequences", "Sequences holding a slot", registry=r).set_function(
            lambda: service.running)
        Gauge("gptexport_slots", "KV cache slots (--max-batch)", registry=r).set_function(lambda: service.slots)

    # the scheduler's observer interface (called on its thread)
    def admitted(self, queue_s: float) -> None:
        self.queue_time.observe(queue_s)

    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)
        self.generated_tokens.inc()

    def step(self, running: int) -> None:
        self.occupancy.observe(running)

    def speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
