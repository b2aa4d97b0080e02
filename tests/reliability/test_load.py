"""A reduced run of benchmarks/soak.py against a real server: a few hundred mixed requests
(every sampler, several step counts, guided and unguided, n = 1–4, both models) from 64
concurrent clients into a small queue. Every request is answered, nothing is 5xx, every
rejection is a 429 with Retry-After, and the server's RSS does not keep growing."""

import asyncio
import itertools
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import metric_samples, value

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak import MiB, mixed_bodies, rss_bytes, run_load, sample_rss

pytestmark = pytest.mark.e2e

REQUESTS = 250
CONCURRENCY = 64
RSS_GROWTH_BOUND = 48 * MiB  # across a third round of the same load


@pytest.fixture(scope="module")
def server(launch):
    return launch("--max-queue", "12", "--max-batch", "32")


def test_mixed_load_loses_nothing_and_rejects_only_with_429(server):
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    bodies = list(itertools.islice(mixed_bodies(cards, seed=1), REQUESTS))
    assert {b["sampler"] for b in bodies} == set(cards[0]["samplers"])  # every sampler
    assert {b["n"] for b in bodies} == {1, 2, 3, 4}
    assert {b.get("guidance_scale") for b in bodies} >= {1.0, 3.0}

    async def three_rounds():
        tallies = [await run_load(server.url, bodies, CONCURRENCY, seconds=120) for _ in range(2)]
        samples: list[tuple[float, int]] = []
        sampler = asyncio.create_task(sample_rss(server.process.pid, 0.5, samples))
        tallies.append(await run_load(server.url, bodies, CONCURRENCY, seconds=120))
        sampler.cancel()
        return tallies, samples

    before = rss_bytes(server.process.pid)
    tallies, samples = asyncio.run(three_rounds())
    for tally in tallies:
        print(tally.summary())
        assert tally.sent == REQUESTS, "the load stopped at its time bound"
        assert tally.problems() == []
        assert tally.server_errors == 0
        assert tally.statuses[200] > REQUESTS // 2
    assert sum(t.statuses[429] for t in tallies) > 0, "the small queue never filled"

    # The server counted what the clients saw.
    metrics = metric_samples(server.url)
    ok = sum(
        value(metrics, "denoised_requests_total", model=c["id"], sampler=s, status="ok")
        for c in cards
        for s in c["samplers"]
    )
    assert ok == sum(t.statuses[200] for t in tallies)
    for card in cards:
        assert value(metrics, "denoised_active_requests", model=card["id"]) == 0
        assert value(metrics, "denoised_queue_depth", model=card["id"]) == 0

    # The first rounds paid the one-time costs and brought the allocator's pools to the
    # load's working set (random batch compositions reach their largest only over time);
    # repeating the same load once more must not grow RSS.
    after_second = samples[0][1]
    end = rss_bytes(server.process.pid)
    print(f"RSS: {before / MiB:.1f} → {after_second / MiB:.1f} → {end / MiB:.1f} MiB")
    assert end - after_second < RSS_GROWTH_BOUND


def test_an_idle_connection_outlives_the_clients_idle_expiry(server):
    """A client that waits out a Retry-After on a keep-alive connection reuses it; had the
    server closed it meanwhile, the next request could be lost in the race (httpx expires
    idle connections after 5 s, so the server keeps them longer)."""
    port = int(server.url.rsplit(":", 1)[1])
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for attempt in range(2):
            if attempt:
                time.sleep(6)
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):  # the whole response, then idle
                chunk = sock.recv(4096)
                assert chunk, f"the server closed the connection after {reply!r}"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply
