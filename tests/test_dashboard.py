"""The Grafana dashboard that ships (``deploy/grafana/ragserve.json``): it loads, has the
panels issue 25 lists, and every series its PromQL names is one a running server exports
(scraped from a real server on loopback: an L2 on a real Redis, a generator that counts
vLLM's prefix cache) or, for the Ray panels, its ``ray_`` twin (``ray/serve/metrics.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.http import get, post, running
from ragserve.testing.redis import redis_server

pytestmark = pytest.mark.http

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ragserve.json"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", v["query"]["query"]))
    return exprs


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are neither functions,
    keywords, labels (inside ``{}`` or a ``by (...)`` list) nor durations."""
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        following = e[m.end():].lstrip()
        if following.startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_series_names_reads_promql_as_meant():
    expr = ('sum by (le, stage) (rate(ragserve_stage_duration_seconds_bucket{stage="total", job=~"$job"}[5m])) '
            '/ ignoring(cache_tier) group_left sum(rate(ragserve_answers_total[$__rate_interval])) == 1')
    assert series_names(expr) == {"ragserve_stage_duration_seconds_bucket", "ragserve_answers_total"}


class CountingGenerator(FakeGenerator):
    """The vllm backend's ``stats()`` shape: its token-weighted prefix-cache counts."""

    def stats(self):
        return {"prefix_cache": {"requests": 1, "queried_tokens": 64, "hit_tokens": 16}, "engine": {}}


def scrape(tmp_path) -> set[str]:
    key = "q" * 32
    quota = {"namespace": "dash", "requests_per_s": 0.01, "burst": 2}
    (tmp_path / "keys.json").write_text(json.dumps({key: quota}))
    auth = {"Authorization": f"Bearer {key}"}  # a tenant with a quota: the quota series
    with redis_server() as redis:
        config = RAGConfig().replace(cache={"redis_url": redis.url})
        rag = fake_rag(tmp_path / "idx", CountingGenerator(), config=config)
        try:
            with running(create_app(rag, config, keys=ApiKeys.load(tmp_path / "keys.json"))) as url:
                q = post(url + "/v1/query", json={"question": "chunk number 1"}, headers=auth)
                assert q.status_code == 200
                bad = post(url + "/v1/query", json={"question": ""}, headers=auth)
                assert bad.status_code == 400  # an error series
                over = post(url + "/v1/query", json={"question": "chunk number 1"}, headers=auth)
                assert over.status_code == 429 and over.json()["error"]["type"] == "QuotaExceeded"
                text = get(url + "/metrics").text
        finally:
            rag.close()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_dashboard_loads_with_the_promised_panels_and_queries_only_exported_series(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("requests by outcome", "cache tier", "p50", "p95", "p99", "in flight and queued",
                   "admission refusals", "quota refusals", "tokens/s", "prefix-cache hit rate",
                   "l2 (redis) breaker", "per replica"):
        assert wanted in titles, wanted
    assert any(t.get("exemplar") for p in dashboard["panels"] for t in p.get("targets", []))
    exported = scrape(tmp_path)
    queried = set().union(*(series_names(e) for e in expressions(dashboard)))
    assert len(queried) >= 15
    missing = {n for n in queried if n.removeprefix("ray_") not in exported}
    assert not missing, f"the dashboard queries series no server exports: {sorted(missing)}"
    ray = {n for n in queried if n.startswith("ray_")}
    assert ray and all(n.startswith("ray_ragserve_") for n in ray)


def test_the_prometheus_example_scrapes_metrics_with_openmetrics_first():
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text("utf-8")
    assert "metrics_path: /metrics" in text and "OpenMetricsText1.0.0" in text
