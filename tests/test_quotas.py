"""Per-tenant quotas and priority classes at the server's edge: the keys file's tenants,
token buckets in-process and on a real Redis (shared by two servers, failing open while it
is down), and the HTTP path on real loopback servers over fakes."""

import asyncio
import json
import math
import time

import pytest

from ragserve.cache.l2 import CircuitBreaker
from ragserve.config import RAGConfig
from ragserve.errors import ConfigError, QuotaExceeded
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.server.quotas import Buckets, Quotas, RedisBuckets
from ragserve.server.tenants import Quota, Tenant, parse_entry
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.http import get, post, running
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import WAIT_S, aeventually

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
KEY_T = "key-t-0123456789abcdef"
KEY_P = "key-p-0123456789abcdef"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# -- the keys file -----------------------------------------------------------------------


def test_a_keys_file_entry_is_a_namespace_or_a_tenant_object():
    assert parse_entry(KEY_A, "acme", "k.json") == Tenant("acme", "acme")
    t = parse_entry(KEY_A, {"namespace": "acme", "name": "acme-batch", "priority": 10, "max_priority": 5,
                            "requests_per_s": 2.5, "tokens_per_min": 600}, "k.json")
    assert (t.name, t.namespace, t.priority, t.max_priority) == ("acme-batch", "acme", 10, 5)
    assert t.quota == Quota(2.5, 3.0, 600.0)  # burst defaults to the rate, rounded up


@pytest.mark.parametrize("entry, message", [
    ({"namespace": "a", "priority": 1, "max_priority": 4}, "max_priority"),
    ({"namespace": "a", "requests_per_s": -1}, "requests_per_s must be a number >= 0"),
    ({"namespace": "a", "priority": "high"}, "priority must be an int"),
    ({"namespace": "a", "requests_per_s": 1, "burst": 0.5}, "burst must be >= 1"),
    ({"namespace": "a", "rate": 1}, "unknown field"),
    ({"name": "a"}, "namespace"),
    ({"namespace": "a", "name": "bad\x1bname"}, "control character"),
    (["a"], "namespace string or an object"),
])
def test_bad_keys_file_entries_are_config_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_entry(KEY_A, entry, "k.json")


def test_a_tenant_cannot_ask_for_a_priority_above_its_maximum():
    t = Tenant("batch", "ns", priority=10, max_priority=5)
    assert t.priority_of(None) == 10 and t.priority_of(5) == 5 and t.priority_of(50) == 50
    with pytest.raises(Exception, match="priority must be >= 5 for this API key"):
        t.priority_of(0)


# -- the buckets -------------------------------------------------------------------------


async def test_the_requests_bucket_refuses_past_its_burst_and_says_when_to_come_back():
    clock = Clock()
    quotas = Quotas([t := Tenant("a", "a", quota=Quota(requests_per_s=2, burst=3))], Buckets(clock))
    for _ in range(3):
        await quotas.admit(t)
    with pytest.raises(QuotaExceeded) as e:
        await quotas.admit(t)
    assert e.value.bucket == "requests" and e.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5  # honoured: admitted
    await quotas.admit(t)
    assert quotas.refusals[("a", "requests")] == 1


async def test_tokens_are_charged_after_generation_and_cache_hits_cost_none():
    clock = Clock()
    t = Tenant("a", "a", quota=Quota(tokens_per_min=60))  # 1 token/s, one minute of burst

    class Result:
        def __init__(self, tier, tokens):
            self.cache_tier, self.usage = tier, type("U", (), {"completion_tokens": tokens})()

    quotas = Quotas([t], Buckets(clock))
    await quotas.admit(t)
    await quotas.charge(t, Result("l1", 500))  # a hit: nothing generated, nothing charged
    await quotas.admit(t)
    await quotas.charge(t, Result("miss", 100))  # 60 - 100: 40 in debt
    with pytest.raises(QuotaExceeded) as e:
        await quotas.admit(t)
    assert e.value.bucket == "tokens" and e.value.retry_after_s == pytest.approx(41.0)
    clock.now += 41
    await quotas.admit(t)


# -- Redis: one bucket for every replica, failing open while it is down -------------------


@pytest.mark.redis
async def test_two_replicas_draw_on_one_redis_bucket_fail_open_while_it_is_down_and_recover():
    tenant = Tenant("shared", "ns", quota=Quota(requests_per_s=0.01, burst=4))
    with redis_server() as srv:
        # ``one``'s timeout is short for the outage below, long enough for a loaded machine otherwise.
        one = Quotas([tenant], RedisBuckets(srv.url, timeout_s=2.0), CircuitBreaker(1, cooldown_s=0.2))
        two = Quotas([tenant], RedisBuckets(srv.url, timeout_s=WAIT_S))
        try:
            calls = (q.admit(tenant) for q in (one, two) * 5)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
            assert len(refused) == 6 and one.admitted + two.admitted == 4  # one bucket, not two
            assert 0 < refused[0].retry_after_s <= 100
            srv.pause()  # hung: each call gives up at its timeout
            try:
                await one.admit(tenant)  # admitted, counted, never an error
                await one.admit(tenant)  # the breaker is open: not even asked
                assert one.fail_open == 2 and one.breaker.state != "closed"
            finally:
                srv.resume()
            await aeventually(lambda: one.breaker.state == "half-open", what="the breaker's cooldown")
            with pytest.raises(QuotaExceeded):  # asked again: the shared bucket is still empty
                await one.admit(tenant)
            assert one.breaker.state == "closed" and one.fail_open == 2
        finally:
            await one.close()
            await two.close()


@pytest.mark.redis
async def test_the_redis_tokens_bucket_charges_generated_tokens_atomically():
    tenant = Tenant("tok", "ns", quota=Quota(tokens_per_min=6))  # 0.1 token/s
    with redis_server() as srv:
        quotas = Quotas([tenant], RedisBuckets(srv.url, timeout_s=WAIT_S))
        try:
            store = quotas.store
            await asyncio.gather(*(store.charge("tok", tenant.quota, 2) for _ in range(5)))  # 6 - 10
            with pytest.raises(QuotaExceeded) as e:
                await quotas.admit(tenant)
            assert e.value.bucket == "tokens" and 49 < e.value.retry_after_s <= 50.01  # (1 + 4) / 0.1
        finally:
            await quotas.close()


# -- HTTP --------------------------------------------------------------------------------


def keys_file(tmp_path, entries):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    return ApiKeys.load(path)


def refusals(url, tenant, bucket="requests"):
    line = f'ragserve_quota_refusals_total{{bucket="{bucket}",tenant="{tenant}"}}'
    for row in get(f"{url}/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return None


def test_over_its_quota_a_tenant_gets_429_with_a_retry_after_that_works_and_others_do_not(tmp_path):
    gen = FakeGenerator()
    rag = fake_rag(tmp_path / "index", gen)
    keys = keys_file(tmp_path, {KEY_A: {"namespace": "a", "name": "alpha", "requests_per_s": 0.5, "burst": 2},
                                KEY_B: "b"})
    a, b = ({"Authorization": f"Bearer {k}"} for k in (KEY_A, KEY_B))
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        q = {"question": "chunk number 3"}
        assert post(f"{url}/v1/query", json=q, headers=a).headers["x-cache"] == "miss"
        assert post(f"{url}/v1/query", json=q, headers=a).headers["x-cache"] == "l1"  # a hit takes one too
        queries = rag.stats()["queries"]
        r = post(f"{url}/v1/query", json=q, headers=a)
        assert r.status_code == 429 and r.json()["error"]["type"] == "QuotaExceeded"
        assert r.json()["error"]["stage"] == "quota" and "alpha" in r.json()["error"]["message"]
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 2
        assert rag.stats()["queries"] == queries and len(gen.prompts) == 1  # the engine never saw it
        for _ in range(5):  # tenant B has no quota: not affected by A's
            assert post(f"{url}/v1/query", json=q, headers=b).status_code == 200
        assert refusals(url, "alpha") == 1.0 and refusals(url, "b") is None
        time.sleep(wait)  # honoured: admitted
        assert post(f"{url}/v1/query", json=q, headers=a).status_code == 200


def test_the_tokens_bucket_over_http_counts_generations_not_hits(tmp_path):
    gen = FakeGenerator(words=4)  # 4 tokens per generation
    rag = fake_rag(tmp_path / "index", gen)
    keys = keys_file(tmp_path, {KEY_T: {"namespace": "t", "tokens_per_min": 5}})
    t = {"Authorization": f"Bearer {KEY_T}"}
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        assert post(f"{url}/v1/query", json={"question": "chunk number 1"}, headers=t).status_code == 200
        for _ in range(3):  # 1 token left: hits are admitted and cost nothing
            r = post(f"{url}/v1/query", json={"question": "chunk number 1"}, headers=t)
            assert r.headers["x-cache"] == "l1"
        r = post(f"{url}/v1/query", json={"question": "chunk number 2", "stream": True}, headers=t)
        assert r.status_code == 200 and "event: done" in r.text  # streamed: charged at its end
        r = post(f"{url}/v1/query", json={"question": "chunk number 3"}, headers=t)
        assert r.status_code == 429 and r.json()["error"]["type"] == "QuotaExceeded"
        # 1 - 4 = -3 tokens: 48 s to one token at 5/min, less what refilled since (seconds here)
        assert 40 <= int(r.headers["retry-after"]) <= math.ceil((1 + 3) / (5 / 60))
        assert refusals(url, "t", "tokens") == 1.0


def test_priority_over_http_body_header_key_default_and_maximum(tmp_path):
    gen = FakeGenerator()
    rag = fake_rag(tmp_path / "index", gen, generate={"scheduling": "priority"}, cache={"enabled": False})
    keys = keys_file(tmp_path, {KEY_P: {"namespace": "p", "priority": 10, "max_priority": 5}})
    p = {"Authorization": f"Bearer {KEY_P}"}
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        q = {"question": "chunk number 3"}
        assert post(f"{url}/v1/query", json=q, headers=p).status_code == 200
        assert post(f"{url}/v1/query", json={**q, "priority": 7}, headers=p).status_code == 200
        assert post(f"{url}/v1/query", json=q, headers={**p, "X-Priority": "6"}).status_code == 200
        assert gen.priorities == [10, 7, 6]
        for bad in ({**q, "priority": 0}, {**q, "priority": "high"}, {**q, "priority": -10**9},
                    {**q, "priority": 10**9}, {**q, "priority": True}):
            r = post(f"{url}/v1/query", json=bad, headers=p)
            assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidParameterError", bad
            assert "priority" in r.json()["error"]["message"]
        r = post(f"{url}/v1/query", json=q, headers={**p, "X-Priority": "high"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidParameterError"
        ask = [{"role": "user", "content": "chunk number 4"}]
        chat = {"model": "ragserve", "priority": 8, "messages": ask}
        assert post(f"{url}/v1/chat/completions", json=chat, headers=p).status_code == 200
        r = post(f"{url}/v1/chat/completions", json={**chat, "priority": 1}, headers=p)
        assert r.status_code == 400 and "max_priority" in r.json()["error"]["message"]
        assert gen.priorities == [10, 7, 6, 8]  # none of the refused reached the engine


@pytest.mark.redis
def test_two_servers_enforce_one_bucket_through_redis(tmp_path):
    with redis_server() as srv:
        entry = {"namespace": "a", "name": "alpha", "requests_per_s": 0.01, "burst": 3}
        keys = keys_file(tmp_path, {KEY_A: entry})
        # A generous Redis timeout: the test is about one bucket, not the 50 ms production bound.
        config = RAGConfig().replace(server={"quota_redis_url": srv.url},
                                     cache={"l2_timeout_ms": WAIT_S * 1e3})
        a = {"Authorization": f"Bearer {KEY_A}"}
        one, two = fake_rag(tmp_path / "one"), fake_rag(tmp_path / "two")
        with one, two, running(create_app(one, config, keys=keys)) as u1, \
                running(create_app(two, config, keys=keys)) as u2:
            codes = [post(f"{u}/v1/query", json={"question": "chunk number 2"}, headers=a).status_code
                     for u in (u1, u2, u1, u2, u1, u2)]
            assert sorted(codes) == [200, 200, 200, 429, 429, 429]
            assert (refusals(u1, "alpha") or 0) + (refusals(u2, "alpha") or 0) == 3


def test_the_client_sends_priority_raises_quota_exceeded_and_honours_its_retry_after(tmp_path):
    from ragserve import Client, InvalidParameterError
    from ragserve.client.retries import Retries

    gen = FakeGenerator()
    rag = fake_rag(tmp_path / "index", gen, generate={"scheduling": "priority"})
    keys = keys_file(tmp_path, {KEY_A: {"namespace": "a", "requests_per_s": 1, "burst": 1},
                                KEY_P: {"namespace": "p", "priority": 10, "max_priority": 5}})
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        with Client(url, api_key=KEY_P) as client:
            client.query("chunk number 5", priority=6)
            with pytest.raises(InvalidParameterError, match="max_priority"):
                client.query("chunk number 6", priority=0)
        assert gen.priorities == [6]
        with Client(url, api_key=KEY_A, retries=Retries(max_attempts=1)) as once:
            assert once.query("chunk number 1").answer
            with pytest.raises(QuotaExceeded) as caught:
                once.query("chunk number 1")
            assert caught.value.status == 429 and caught.value.retry_after_s == 1
        with Client(url, api_key=KEY_A, retries=Retries(max_attempts=4, backoff_s=0.01)) as patient:
            assert patient.query("chunk number 1").cache_tier == "l1"  # after waiting its Retry-After
