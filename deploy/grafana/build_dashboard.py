"""Writes ``kvtier.json``, the Grafana dashboard for a kvtier daemon (and engines) scraped by Prometheus.

Run ``python deploy/grafana/build_dashboard.py`` after changing a panel; ``tests/test_cli_deploy.py``
checks that the JSON is this script's output and that every metric a panel queries is one that a
running ``kvtier server`` exports. Plain dicts, no SDK: the dashboard is small and the test, not a
library, is what keeps it true.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("kvtier.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job"'

# (title, unit, [(expr, legend)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Key hit rate (daemon lookups, 5m)", "percentunit",
     [(f"sum(rate(kvtier_server_hit_keys_total{{{SEL}}}[5m])) / clamp_min(sum(rate(kvtier_server_lookup_keys_total{{{SEL}}}[5m])), 1)", "keys hit / keys asked")], 8),
    ("Request hit rate (daemon, 5m)", "percentunit",
     [(f"sum(rate(kvtier_server_hit_lookups_total{{{SEL}}}[5m])) / clamp_min(sum(rate(kvtier_server_lookups_total{{{SEL}}}[5m])), 1)", "lookups with a hit")], 8),
    ("Token hit rate (engines, 5m)", "percentunit",
     [(f"sum(rate(kvtier_hit_tokens_total{{{SEL}}}[5m])) / clamp_min(sum(rate(kvtier_lookup_tokens_total{{{SEL}}}[5m])), 1)", "hit tokens / asked"),
      (f"max(kvtier_hit_rate{{{SEL}}})", "lifetime")], 8),
    ("Bytes held per tier", "bytes",
     [(f"sum by (tier) (kvtier_tier_used_bytes{{{SEL}}})", "{{tier}} used"),
      (f"sum by (tier) (kvtier_tier_capacity_bytes{{{SEL}}})", "{{tier}} capacity")], 12),
    ("Chunk hits and misses per tier", "ops",
     [(f"sum by (tier) (rate(kvtier_tier_hits_total{{{SEL}}}[5m]))", "{{tier}} hits"),
      (f"sum by (tier) (rate(kvtier_tier_misses_total{{{SEL}}}[5m]))", "{{tier}} misses")], 12),
    ("Evictions per tier", "ops",
     [(f"sum by (tier) (rate(kvtier_tier_evictions_total{{{SEL}}}[5m]))", "{{tier}} chunks/s"),
      (f"sum by (tier) (rate(kvtier_tier_evicted_bytes_total{{{SEL}}}[5m]))", "{{tier}} bytes/s")], 12),
    ("Tier read latency (mean)", "s",
     [(f"sum by (tier) (rate(kvtier_tier_get_seconds_total{{{SEL}}}[5m])) / clamp_min(sum by (tier) (rate(kvtier_tier_hits_total{{{SEL}}}[5m]) + rate(kvtier_tier_misses_total{{{SEL}}}[5m])), 1e-9)", "{{tier}}")], 12),
    ("Engine (vLLM / in-process) latency p50 / p99", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate(kvtier_retrieve_seconds_bucket{{{SEL}}}[5m])))", "retrieve p50"),
      (f"histogram_quantile(0.99, sum by (le) (rate(kvtier_retrieve_seconds_bucket{{{SEL}}}[5m])))", "retrieve p99"),
      (f"histogram_quantile(0.99, sum by (le) (rate(kvtier_store_seconds_bucket{{{SEL}}}[5m])))", "store p99"),
      (f"histogram_quantile(0.99, sum by (le) (rate(kvtier_lookup_seconds_bucket{{{SEL}}}[5m])))", "lookup p99")], 12),
    ("Daemon request latency p50 / p99 by op", "s",
     [(f"histogram_quantile(0.5, sum by (le, op) (rate(kvtier_server_request_seconds_bucket{{{SEL}}}[5m])))", "{{op}} p50"),
      (f"histogram_quantile(0.99, sum by (le, op) (rate(kvtier_server_request_seconds_bucket{{{SEL}}}[5m])))", "{{op}} p99")], 12),
    ("Errors (each one a cache miss, never a failed request)", "ops",
     [(f"sum by (tier) (rate(kvtier_tier_errors_total{{{SEL}}}[5m]))", "{{tier}} errors"),
      (f"sum by (tier) (rate(kvtier_tier_queue_drops_total{{{SEL}}}[5m]))", "{{tier}} queue drops"),
      (f"sum(rate(kvtier_server_protocol_errors_total{{{SEL}}}[5m]))", "protocol errors"),
      (f"sum(rate(kvtier_server_auth_failures_total{{{SEL}}}[5m]))", "auth failures"),
      (f"sum(rate(kvtier_fingerprint_mismatches_total{{{SEL}}}[5m]))", "fingerprint mismatches")], 12),
    ("Daemon traffic", "Bps",
     [(f"sum(rate(kvtier_server_shm_bytes_out_total{{{SEL}}}[5m]))", "shm out"),
      (f"sum(rate(kvtier_server_shm_bytes_in_total{{{SEL}}}[5m]))", "shm in"),
      (f"sum(rate(kvtier_server_socket_bytes_out_total{{{SEL}}}[5m]))", "socket out"),
      (f"sum(rate(kvtier_server_socket_bytes_in_total{{{SEL}}}[5m]))", "socket in")], 12),
    ("Daemon sessions and requests", "short",
     [(f"sum(kvtier_server_active_sessions{{{SEL}}})", "sessions"),
      (f"sum(rate(kvtier_server_requests_total{{{SEL}}}[5m]))", "requests/s")], 12),
    ("vLLM connector: token hit rate (vllm serve /metrics, 5m)", "percentunit",
     [(f"sum(rate(kvtier_vllm_hit_tokens_total{{{SEL}}}[5m])) / clamp_min(sum(rate(kvtier_vllm_lookup_tokens_total{{{SEL}}}[5m])), 1)", "hit tokens / looked up")], 12),
    ("vLLM connector: tokens and bytes moved", "short",
     [(f"sum(rate(kvtier_vllm_loaded_tokens_total{{{SEL}}}[5m]))", "loaded tokens/s (prefill skipped)"),
      (f"sum(rate(kvtier_vllm_saved_tokens_total{{{SEL}}}[5m]))", "saved tokens/s"),
      (f"sum(rate(kvtier_vllm_load_bytes_total{{{SEL}}}[5m]))", "load bytes/s"),
      (f"sum(rate(kvtier_vllm_save_bytes_total{{{SEL}}}[5m]))", "save bytes/s"),
      (f"sum(rate(kvtier_vllm_failed_blocks_total{{{SEL}}}[5m]))", "failed blocks/s (recomputed)")], 12),
    ("Process memory and CPU", "bytes",
     [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}} RSS"),
      (f"rate(process_cpu_seconds_total{{{SEL}}}[5m])", "{{instance}} CPU cores")], 12),
]  # fmt: skip


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": e, "legendFormat": leg}
                        for j, (e, leg) in enumerate(targets)],
        })  # fmt: skip
        x += width
    return {
        "title": "kvtier", "uid": "kvtier", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["kvtier", "kv-cache"], "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "datasource": DS, "query": "label_values(kvtier_tier_chunks, job)",
             "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }  # fmt: skip


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
