"""HTTP details over a real server on loopback: HEAD on the probe endpoints, 405 in the error
shape, every response counted by route template and status, and the request id on the
engine's log lines; in-process with the real app: HEAD /ready while draining."""

from collections import Counter

import httpx
from fastapi.testclient import TestClient
from serving_helpers import metric_samples, value, wait_for

from denoised.server.http.api import create_app
from denoised.server.metrics import UNMATCHED_ROUTE
from denoised.server.settings import Settings


def test_head_on_health_and_ready_answers_like_get_without_a_body(server):
    for path in ("/health", "/ready"):
        get = httpx.get(server.url + path)
        head = httpx.head(server.url + path)
        assert head.status_code == get.status_code == 200
        assert get.content and head.content == b""
        assert head.headers["x-request-id"].startswith("req_")


def test_head_on_ready_is_503_while_draining_and_health_stays_200(model_dirs):
    app = create_app(Settings(compile=False, models=tuple(model_dirs[:1]), warmup=False))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, 60, "the model to load")
        assert client.head("/ready").status_code == 200
        app.state.server.begin_drain()
        assert client.head("/ready").status_code == 503
        assert client.get("/ready").json()["status"] == "draining"
        assert client.head("/health").status_code == 200


def test_a_wrong_method_is_405_in_the_error_shape(server):
    response = httpx.get(server.url + "/v1/generate")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("method_not_allowed", 405)
    assert error["request_id"] == response.headers["x-request-id"]


def test_every_response_is_counted_by_route_template_and_status(server):
    calls = [  # method, path, JSON body, the route label it must count under
        ("GET", "/v1/models/no-such-model", None, "/v1/models/{model_id}"),
        ("GET", "/v1/models/another-one", None, "/v1/models/{model_id}"),
        ("GET", "/no/such/path/1", None, UNMATCHED_ROUTE),
        ("GET", "/no/such/path/2", None, UNMATCHED_ROUTE),
        ("POST", "/v1/generate", {"n": 0}, "/v1/generate"),
        ("GET", "/v1/generate", None, "/v1/generate"),
        ("POST", "/v1/generate", {"model": "x" * 70_000}, "/v1/generate"),  # over 64 KiB
        ("HEAD", "/ready", None, "/ready"),
    ]
    before = metric_samples(server.url)
    sent = Counter()
    for method, path, body, route in calls:
        response = httpx.request(method, server.url + path, json=body)
        sent[route, str(response.status_code)] += 1
    after = metric_samples(server.url)
    assert set(sent) == {
        ("/v1/models/{model_id}", "404"),
        (UNMATCHED_ROUTE, "404"),
        ("/v1/generate", "422"),
        ("/v1/generate", "405"),
        ("/v1/generate", "413"),
        ("/ready", "200"),
    }
    for (route, code), count in sent.items():
        labels = {"route": route, "code": code}
        moved = value(after, "denoised_http_responses_total", **labels) - value(
            before, "denoised_http_responses_total", **labels
        )
        assert moved == count, (route, code)
    routes = {dict(labels)["route"] for name, labels in after if name.startswith("denoised_http")}
    assert not [route for route in routes if "no-such" in route or "/no/" in route]


def test_engine_log_lines_carry_the_request_id(server):
    served, late = "log-served-1", "log-late-2"
    body = {"model": "tiny-dit", "label": "1", "steps": 2}
    ok = httpx.post(server.url + "/v1/generate", json=body, headers={"x-request-id": served})
    assert ok.status_code == 200
    timeout = {**body, "steps": 50, "timeout": 1e-6}  # ended by the engine thread: 504
    missed = httpx.post(server.url + "/v1/generate", json=timeout, headers={"x-request-id": late})
    assert missed.status_code == 504

    def engine_lines(request_id: str) -> list[str]:
        lines = server.log.read_text(errors="replace").splitlines()
        return [line for line in lines if " denoised.engine " in line and request_id in line]

    for request_id, outcome in ((served, " ok: "), (late, " timeout ")):
        wait_for(lambda rid=request_id: engine_lines(rid), 10, f"the log line of {request_id}")
        lines = engine_lines(request_id)
        assert any(outcome in line for line in lines), lines
        assert all(f" [{request_id}]: " in line for line in lines), lines
