"""Prometheus metrics of the API server: request outcomes and latencies, and per instance
its queue, running batch, KV blocks and KV transfers (read from the engine at scrape)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from distserve.engine.messages import InstanceStatus
from distserve.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class InstanceCollector(Collector):
    """Gauges and counters from each instance's latest stats."""

    def __init__(self, instance_status: Callable[[], list[InstanceStatus]]) -> None:
        self.instance_status = instance_status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["instance", "role"]
        gauges = {
            "num_waiting": GaugeMetricFamily("distserve_queue_length", "Requests queued on the instance (prompts or migrations).",
                labels=labels),
            "num_running": GaugeMetricFamily("distserve_running_requests", "Requests in the instance's running batch.", labels=labels),
            "kv_blocks_used": GaugeMetricFamily("distserve_kv_blocks_used", "KV cache blocks in use.", labels=labels),
            "kv_blocks_free": GaugeMetricFamily("distserve_kv_blocks_free", "KV cache blocks free.", labels=labels),
            "alive": GaugeMetricFamily("distserve_instance_up", "1 while the instance process is alive.", labels=labels),
            "pid": GaugeMetricFamily("distserve_instance_pid", "Process id of the instance's driver.", labels=labels),
            "weight_bytes": GaugeMetricFamily("distserve_weight_bytes", "Bytes of model weights the instance's driver holds.",
                                              labels=labels),
        }
        counters = {
            "num_transfers": CounterMetricFamily("distserve_kv_transfers", "KV cache pulls done by the instance.", labels=labels),
            "transferred_tokens": CounterMetricFamily("distserve_kv_transfer_tokens", "Tokens of KV cache pulled.", labels=labels),
            "transferred_bytes": CounterMetricFamily("distserve_kv_transfer_bytes", "Bytes of KV cache pulled.", labels=labels),
            "transfer_seconds": CounterMetricFamily("distserve_kv_transfer_seconds", "Seconds spent pulling KV cache.", labels=labels),
            "num_preemptions": CounterMetricFamily("distserve_preemptions", "Requests preempted for lack of KV blocks.", labels=labels),
            "prefix_cache_queries": CounterMetricFamily("distserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                                        labels=labels),
            "prefix_cache_hits": CounterMetricFamily("distserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                                     labels=labels),
        }
        restarts = CounterMetricFamily("distserve_instance_restarts", "Times the instance was started again after dying.",
                                       labels=labels)
        by_transport = CounterMetricFamily("distserve_kv_transfer_transport_bytes", "Bytes of KV cache pulled, by transport.",
                                           labels=[*labels, "transport"])
        for status in self.instance_status():
            stats, key = status.stats, [status.name, str(status.role)]
            for transport, n in (stats.transferred_bytes_by_transport if stats else {}).items():
                by_transport.add_metric([*key, transport], n)
            gauges["alive"].add_metric(key, 1.0 if status.alive else 0.0)
            restarts.add_metric(key, status.restarts)
            gauges["pid"].add_metric(key, status.pid)
            if not status.alive:  # its last stats describe nothing any more
                continue
            total = status.num_blocks
            free = stats.kv_blocks_free if stats else total
            waiting = (stats.num_waiting + stats.num_pending_migrations) if stats else 0
            gauges["num_waiting"].add_metric(key, waiting)
            gauges["num_running"].add_metric(key, stats.num_running if stats else 0)
            gauges["kv_blocks_used"].add_metric(key, total - free)
            gauges["kv_blocks_free"].add_metric(key, free)
            gauges["weight_bytes"].add_metric(key, stats.weight_bytes if stats else 0)
            for name, family in counters.items():
                family.add_metric(key, getattr(stats, name) if stats else 0)
        yield from gauges.values()
        yield from counters.values()
        yield restarts
        yield by_transport


class ServerMetrics:
    def __init__(self, instance_status: Callable[[], list[InstanceStatus]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distserve_requests", "Finished requests by outcome.", ["status"], registry=self.registry
        )
        self.prompt_tokens = Counter("distserve_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry)
        self.generation_tokens = Counter("distserve_generation_tokens", "Generated tokens.", registry=self.registry)
        self.ttft = Histogram(
            "distserve_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "distserve_time_per_output_token_seconds", "Time per output token after the first.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "distserve_e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.registry.register(InstanceCollector(instance_status))

    def observe(self, output: RequestOutput) -> None:
        """Count a finished request (any outcome)."""
        completion = output.outputs[0]
        status = "error" if output.error else (completion.finish_reason or "abort")
        self.requests.labels(status=status).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(len(completion.token_ids))
        m = output.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None and m.num_generated_tokens > 1:
            self.tpot.observe(m.tpot)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)

    def observe_status(self, status: str) -> None:
        """Count a request that ended without an output: rejected, or abandoned by its client."""
        self.requests.labels(status=status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
