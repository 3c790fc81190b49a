"""``ragserve serve``'s app against the real engine (the session's one vLLM engine),
served by a real uvicorn on loopback, called by real clients: httpx, the openai SDK and a
headless Chromium."""

import asyncio
import os
from pathlib import Path

import httpx
import openai
import pytest

from ragserve.server.app import create_app
from ragserve.testing.http import running
from ragserve.testing.waits import WAIT_S, eventually

pytestmark = [pytest.mark.engine, pytest.mark.http]

ARTIFACTS = Path(os.environ.get("RAGSERVE_ARTIFACTS", Path(__file__).resolve().parent.parent / "reports" / "tests"))


@pytest.fixture(scope="module")
def url(rag):
    with running(create_app(rag, rag.config)) as base:
        yield base


def test_openai_sdk_answers_with_sources_streaming_and_not(url, xquad_corpus):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    q = xquad_corpus[1][40]
    r = client.chat.completions.create(model="ragserve", messages=[{"role": "user", "content": q["question"]}])
    assert r.choices[0].message.content.strip() and r.model == "SmolLM2-135M-Instruct"
    assert q["doc_id"] in {s["doc_id"] for s in r.model_extra["sources"]}
    stream = client.chat.completions.create(model="ragserve", stream=True,
                                            messages=[{"role": "user", "content": xquad_corpus[1][71]["question"]}])
    chunks = list(stream)
    assert chunks[0].model_extra["sources"] and chunks[0].choices == []
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # tokens arrive as they are generated, not as one block
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_native_stream_over_http_orders_sources_tokens_done(url, xquad_corpus):
    with httpx.stream("POST", f"{url}/v1/query", timeout=60,
                      json={"question": xquad_corpus[1][72]["question"], "stream": True, "cache": {"read": False}}) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "sources" and names[-1] == "done" and names.count("token") > 1


def test_a_client_leaving_mid_stream_aborts_its_vllm_request_and_caches_nothing(url, rag, xquad_corpus):
    writes = rag.stats()["cache"]["l1"]["writes"]
    q = xquad_corpus[1][43]["question"]
    with httpx.stream("POST", f"{url}/v1/query", json={"question": q, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # leave after the first token: the connection closes
    eventually(lambda: rag.generator.unfinished() == 0, what="the abandoned request to leave vLLM")
    assert rag.stats()["cache"]["l1"]["writes"] == writes


def test_a_client_timing_out_on_a_plain_query_aborts_it_too(url, rag, xquad_corpus):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/query", json={"question": xquad_corpus[1][44]["question"]}, timeout=0.5)
    eventually(lambda: rag.generator.unfinished() == 0, what="the abandoned request to leave vLLM")


def test_a_short_deadline_is_504_and_its_vllm_request_is_aborted(url, rag, xquad_corpus):
    r = httpx.post(f"{url}/v1/query", timeout=30,
                   json={"question": xquad_corpus[1][45]["question"], "timeout_s": 0.1, "cache": {"read": False}})
    assert r.status_code == 504 and r.json()["error"]["type"] == "DeadlineExceededError"
    eventually(lambda: rag.generator.unfinished() == 0, what="the request past its deadline to leave vLLM")


def test_a_burst_past_the_admission_bounds_gets_429_at_once(url, rag, xquad_corpus, monkeypatch):
    monkeypatch.setattr(rag.admission, "max_in_flight", 2)
    monkeypatch.setattr(rag.admission, "max_queued", 2)
    qs = [q["question"] for q in xquad_corpus[1][50:62]]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/query", json={"question": q, "cache": {"read": False}})
                                          for q in qs))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert statuses.count(200) >= 4 and len(refused) >= 4 and set(statuses) <= {200, 429}
    assert all(r.headers["retry-after"] for r in refused)
    slowest = max(r.elapsed.total_seconds() for r in refused)
    print(f"429 answered in at most {slowest * 1e3:.1f} ms")
    # refused at admission, before any generation ends: faster than every answer (a load that
    # slows the one slows the other), not under a fixed second
    assert slowest < min(r.elapsed.total_seconds() for r in responses if r.status_code == 200)


def test_the_page_in_a_real_browser_shows_answer_sources_and_waterfall(url, xquad_corpus):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        q = xquad_corpus[1][46]
        driver.find_element(By.ID, "question").send_keys(q["question"])
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        assert driver.find_element(By.ID, "answer").text.strip()
        sources = driver.find_elements(By.CSS_SELECTOR, "#sources li")
        assert len(sources) >= 1 and "score" in sources[0].text
        stages = [e.get_attribute("data-stage") for e in driver.find_elements(By.CSS_SELECTOR, "#waterfall .wf-row")]
        assert {"embed", "search", "generate", "total"} <= set(stages)
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stats-table tbody tr"))
        assert driver.find_elements(By.CSS_SELECTOR, "#tiers tbody tr")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "page.png"))
    finally:
        driver.quit()
