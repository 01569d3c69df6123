"""The daemon's ``/metrics``: every exported series is true (it equals what ``/stats`` says).

Issue 22 (10): the daemon exported the engine's series (``kvtier_hit_tokens_total``, hit rate,
latency histograms), which stayed 0 while ``kvtier_server_hit_keys_total`` counted hits.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import make_kv, make_tokens
from tests.server.test_http import NS, _engine, _get, _post

from kvtier.server.process import DaemonProcess
from kvtier.wire.token_file import read_token_file


def test_every_exported_series_is_true(daemon: DaemonProcess) -> None:
    tokens = make_tokens(96, seed=21)
    with _engine(daemon.url) as eng:
        assert eng.store(tokens, make_kv(96, seed=21)) == 96
        assert eng.lookup(tokens) == 96
        assert eng.retrieve(tokens).num_tokens == 96
        assert eng.lookup(make_tokens(32, seed=22)) == 0
    tok = read_token_file(daemon.info["token_file"])
    assert (
        _post(daemon.http_url + "/lookup", {"tokens": tokens.tolist(), **NS}, tok)[1]["cached_tokens"] == 96
    )
    code, body = _get(daemon.http_url + "/metrics")
    assert code == 200
    stats = json.loads(_get(daemon.http_url + "/stats")[1])
    server = stats["server"]
    untrue: list[str] = []
    request_counts = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            name, labels, value = s.name, s.labels, s.value
            if name.startswith("process_"):  # prometheus_client's own process collector (RSS, fds, CPU)
                continue
            if name.startswith("kvtier_server_request_seconds"):
                request_counts += value if name.endswith("_count") else 0
                continue
            if name.startswith("kvtier_tier_"):
                field = name.removeprefix("kvtier_tier_").removesuffix("_total")
                field = {"used_bytes": "bytes_used"}.get(field, field)  # Prometheus unit-last naming
                truth = stats.get(f"tier:{labels.get('tier')}", {}).get(field)
            elif name.startswith("kvtier_server_"):
                truth = server.get(name.removeprefix("kvtier_server_").removesuffix("_total"))
            else:
                truth = None
            if truth is None or abs(float(truth) - value) > 1e-6 * max(1.0, abs(value)):
                untrue.append(f"{name}{labels or ''} = {value} (stats: {truth})")
    assert not untrue, "series that are not what the daemon measured:\n" + "\n".join(untrue)
    assert request_counts == server["requests"] > 0  # the latency histogram moves with requests
    assert server["hit_keys"] >= 12 and server["lookups"] >= 3  # and the hit series do move
