"""The HTTP layer in-process (the app with its real engine, through Starlette's TestClient):
error shapes and codes, validation messages, raw-bytes responses, auth, the OpenAPI schema,
readiness with a model that failed to load."""

import base64
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_models import write_tiny_models

from denoised.server.http.api import create_app
from denoised.server.settings import Settings


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = write_tiny_models(tmp_path_factory.mktemp("models"))
    return tuple(str(d) for d in dirs.values())


def loaded_client(settings: Settings) -> TestClient:
    """A started app whose models have finished loading (or failed to)."""
    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/ready").json()["status"] == "loading":
        assert time.monotonic() < deadline, "the models did not load in 60 s"
        time.sleep(0.05)
    return client


def ready_client(settings: Settings) -> TestClient:
    client = loaded_client(settings)
    assert client.get("/ready").status_code == 200, client.get("/ready").json()
    return client


@pytest.fixture(scope="module")
def client(model_dirs):
    settings = Settings(
        compile=False, models=model_dirs, max_n=4, max_steps=50, max_body_bytes=2048
    )
    client = ready_client(settings)
    yield client
    client.__exit__(None, None, None)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_unknown_model_is_404_listing_the_served_ones(client):
    error = error_of(client.post("/v1/generate", json={"model": "sdxl"}), 404)
    assert error["param"] == "model" and "tiny-dit" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"sampler": "k_lms"}, "sampler", ["'ddim'", "'unipc'"]),
        ({"output_format": "jpeg"}, "output_format", ["'png'", "'webp'", "'npy'"]),
        ({"response_format": "url"}, "response_format", ["'b64_json'", "'bytes'"]),
        ({"prompt": "cat"}, "prompt", ["unknown class 'cat'", "'9'"]),
        ({"n": 5}, "n", ["at most 4"]),
        ({"n": 0}, "n", ["greater than or equal to 1"]),
        ({"steps": 51}, "steps", ["at most 50"]),
        ({"size": "64x64"}, "size", ["'8x8'"]),
        ({"size": "8X8"}, "size", ["'8x8'", "'auto'"]),
        ({"size": "8"}, "size", ["'8x8'", "'auto'"]),
        ({"guidance_scale": -1}, "guidance_scale", ["greater than or equal to 0"]),
        ({"guidance_scale": 7}, "guidance_scale", ["guidance needs a label", "no prompt"]),
        ({"sampler": "ddim", "sampler_options": {"etta": 1}}, "sampler_options.etta", ["eta"]),
        ({"sampler": "ddim", "sampler_options": {"eta": -1}}, "sampler_options.eta", ["[0, 1]"]),
        ({"sampler_options": {"spacing": "even"}}, "sampler_options.spacing", ["'trailing'"]),
        (
            {"sampler_options": {"lower_order_final": 1}},
            "sampler_options.lower_order_final",
            ["true or false"],
        ),
        (
            {"sampler_options": {"spacing": "leading", "final": "min"}},
            "sampler_options.final",
            ["'leading'"],
        ),
        ({"prompt": "3", "quality": "hd"}, "quality", ["'hd' is not supported", "'auto'"]),
        ({"style": "vivid"}, "style", ["'vivid' is not supported", "no styles"]),
        ({"background": "transparent"}, "background", ["not supported", "alpha"]),
        ({"moderation": "low"}, "moderation", ["not supported", "'auto'"]),
        ({"output_compression": 80}, "output_compression", ["not supported", "lossless"]),
        ({"partial_images": 2}, "partial_images", ["stream events", "stream: true"]),
        ({"partial_images": 4, "stream": True}, "partial_images", ["less than or equal to 3"]),
        ({"partial_images": -1, "stream": True}, "partial_images", ["greater than or equal to 0"]),
        ({"partial_images": True, "stream": True}, "partial_images", ["valid integer"]),
        ({"partial_images": 2.0, "stream": True}, "partial_images", ["valid integer"]),
        (
            {"partial_images": 1, "stream": True, "preview": True},
            "partial_images",
            ["not both", "per evaluation"],
        ),
        ({"partial_images": 0, "preview": True}, "partial_images", ["not both"]),
        ({"response_format": "url"}, "response_format", ["'url' is not supported", "'bytes'"]),
        ({"output_format": "jpeg"}, "output_format", ["'jpeg' is not supported", "'webp'"]),
        ({"colour": "red"}, "colour", ["unknown field"]),
        ({"preview": True}, "preview", ["stream"]),
        ({"n": 2, "response_format": "bytes"}, "response_format", ["npy"]),
    ],
)
def test_invalid_fields_are_422_naming_field_and_allowed_values(client, body, param, words):
    error = error_of(client.post("/v1/images/generations", json=body), 422)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


WRONG_TYPES = [
    ("label", False), ("label", True), ("label", 3.0), ("n", "2"), ("n", True), ("n", 2.0),
    ("steps", "20"), ("steps", " 10 "), ("steps", "1_0"), ("seed", "7"), ("seed", 7.0),
    ("guidance_scale", "3"), ("timeout", "5"), ("stream", "yes"), ("stream", 1),
    ("preview", "no"), ("model", 5), ("size", 8), ("sampler_options", "eta=1"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/images/generations"])
def test_json_values_of_the_wrong_type_are_422_not_coerced(client, path, field, value):
    if field == "label" and path == "/v1/images/generations":
        field = "prompt"
    error = error_of(client.post(path, json={"steps": 2, field: value}), 422)
    assert error["param"] == field and error["message"].startswith(f"{field}: ")


def test_integers_are_numbers_and_labels_are_names_or_ids(client):
    body = {"steps": 2, "guidance_scale": 3, "timeout": 30, "seed": 1, "output_format": "npy"}
    by_id = client.post("/v1/generate", json={**body, "label": 3})
    by_name = client.post("/v1/images/generations", json={**body, "prompt": " 3 "})
    for response in (by_id, by_name):
        assert response.status_code == 200, response.text
        assert (response.json()["label"], response.json()["guidance_scale"]) == ("3", 3.0)
    assert by_id.json()["images"][0] == by_name.json()["data"][0]


def images_of(client, path: str, body: dict) -> list[np.ndarray]:
    response = client.post(path, json={**body, "output_format": "npy"})
    assert response.status_code == 200, response.text
    data = response.json()
    items = data["data"] if "data" in data else data["images"]
    return [np.load(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in items]


def test_unconditional_requests_apply_and_echo_no_guidance(client):
    for path, param in (("/v1/generate", "label"), ("/v1/images/generations", "prompt")):
        plain = client.post(path, json={"seed": 5, "steps": 3})
        assert (plain.json()["label"], plain.json()["guidance_scale"]) == (None, 1.0)
        unguided = images_of(client, path, {"seed": 5, "steps": 3, "guidance_scale": 1})
        np.testing.assert_array_equal(images_of(client, path, {"seed": 5, "steps": 3}), unguided)
        error = error_of(client.post(path, json={"seed": 5, "guidance_scale": 7}), 422)
        assert error["param"] == "guidance_scale"
        assert "guidance needs a label" in error["message"] and param in error["message"]


def test_size_auto_is_the_native_size(client):
    response = client.post("/v1/images/generations", json={"size": "auto", "steps": 2})
    assert response.status_code == 200 and response.json()["size"] == "8x8"


def test_openai_fields_at_their_defaults_are_accepted(client):
    defaults = {"quality": "standard", "background": "opaque", "moderation": "auto",
                "output_compression": 100, "partial_images": 0, "style": None}  # fmt: skip
    body = {"prompt": "3", "steps": 2, "seed": 4, "output_format": "npy"}
    plain = client.post("/v1/images/generations", json=body).json()["data"]
    given = client.post("/v1/images/generations", json={**body, **defaults})
    assert given.status_code == 200, given.text
    assert given.json()["data"] == plain
    quality = client.post("/v1/images/generations", json={**body, "quality": "auto"})
    assert quality.status_code == 200
    error = error_of(client.post("/v1/generate", json={"quality": "auto"}), 422)
    assert error["message"] == "unknown field 'quality'"  # OpenAI fields: that endpoint only


@pytest.mark.parametrize(("sampler", "n"), [("ddim", 3), ("dpmpp-2m-sde", 3), ("euler", 2)])
def test_image_k_of_a_request_is_image_0_of_the_request_with_seed_plus_k(client, sampler, n):
    body = {"label": "4", "sampler": sampler, "steps": 5, "guidance_scale": 2.0}
    seed = 2**63 - 2  # image 1 of this request has the largest seed, image 2 wraps to 0
    together = images_of(client, "/v1/generate", {**body, "n": n, "seed": seed})
    for k in range(n):
        alone = images_of(client, "/v1/generate", {**body, "seed": (seed + k) % 2**63})
        np.testing.assert_allclose(together[k], alone[0], atol=1e-4, rtol=0)
    assert np.abs(together[0] - together[1]).max() > 0.05  # each image has its own noise


def test_non_finite_numbers_and_malformed_json_are_rejected(client):
    headers = {"content-type": "application/json"}
    nan = client.post("/v1/generate", content='{"guidance_scale": NaN}', headers=headers)
    assert error_of(nan, 422)["param"] == "guidance_scale"
    error_of(client.post("/v1/generate", content='{"n": 1', headers=headers), 400)


def test_oversized_body_is_413(client):
    error = error_of(client.post("/v1/generate", json={"model": "x" * 4000}), 413)
    assert "2048 bytes" in error["message"]


def test_client_request_id_is_echoed(client):
    response = client.post("/v1/generate", json={"n": 0}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["error"]["request_id"] == "abc-123"


def test_raw_bytes_responses(client):
    png = client.post(
        "/v1/generate", json={"label": "2", "steps": 3, "seed": 9, "response_format": "bytes"}
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == "9"
    assert Image.open(io.BytesIO(png.content)).size == (8, 8)
    npy = client.post(
        "/v1/generate",
        json={"n": 3, "steps": 3, "output_format": "npy", "response_format": "bytes"},
    )
    array = np.load(io.BytesIO(npy.content))
    assert array.shape == (3, 8, 8, 1) and array.dtype == np.float32


def test_models_list_in_openai_shape(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {"tiny-dit", "tiny-flow"}
    dit = cards["tiny-dit"]
    assert dit["object"] == "model" and dit["classes"] == [str(i) for i in range(10)]
    assert dit["sizes"] == ["8x8"] and "heun" in dit["samplers"]
    assert cards["tiny-flow"]["process"] == "flow"
    assert client.get("/v1/models/tiny-flow").json()["id"] == "tiny-flow"
    error_of(client.get("/v1/models/nope"), 404)


def test_openapi_documents_both_endpoints_with_examples_and_errors(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/generate"):
        post = schema["paths"][path]["post"]
        assert {"404", "422", "429", "503", "504"} <= set(post["responses"])
        assert "text/event-stream" in post["responses"]["200"]["content"]
    components = schema["components"]["schemas"]
    assert components["ImagesRequest"]["examples"][0]["prompt"] == "3"
    assert components["ImagesRequest"]["properties"]["quality"]  # OpenAI fields are documented
    assert "sampler_options" in components["GenerateRequest"]["properties"]
    for path in ("/v1/models", "/health", "/ready", "/metrics"):
        assert path in schema["paths"]


def test_api_keys_guard_everything_but_health_and_ready(model_dirs):
    settings = Settings(compile=False, models=model_dirs[:1], api_keys=("s3cret",), warmup=False)
    client = ready_client(settings)
    try:
        assert client.get("/health").status_code == 200
        error = error_of(client.get("/v1/models"), 401)
        assert "API key" in error["message"]
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/metrics").status_code == 200  # metrics_auth is off
    finally:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def with_broken(model_dirs, tmp_path_factory) -> tuple[str, ...]:
    """The two tiny models and `no-weights`, a model directory without its weights file."""
    broken = tmp_path_factory.mktemp("broken") / "no-weights"
    broken.mkdir()
    shutil.copy(Path(model_dirs[0]) / "config.json", broken / "config.json")
    return (*model_dirs, str(broken))


def ready_gauge(client: TestClient) -> float:
    lines = client.get("/metrics").text.splitlines()
    return float(next(line for line in lines if line.startswith("denoised_ready ")).split()[1])


def test_strict_readiness_is_503_naming_the_failed_model_while_the_others_serve(with_broken):
    client = loaded_client(
        Settings(compile=False, models=with_broken, warmup=False)
    )  # strict by default
    try:
        ready = client.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert (body["ready"], body["status"]) == (False, "degraded")
        assert body["models"] == ["tiny-dit", "tiny-flow"]
        assert list(body["detail"]["unavailable"]) == ["no-weights"]
        assert "model.safetensors" in body["detail"]["unavailable"]["no-weights"]
        assert "no-weights" in body["detail"]["error"]
        assert ready_gauge(client) == 0
        assert client.get("/health").status_code == 200  # alive, just not ready
        served = client.post("/v1/generate", json={"model": "tiny-flow", "steps": 2})
        assert served.status_code == 200 and len(served.json()["images"]) == 1
        error = error_of(client.post("/v1/generate", json={"model": "no-weights"}), 503)
        assert "failed to load" in error["message"] and error["param"] == "model"
    finally:
        client.__exit__(None, None, None)


def test_without_strict_readiness_a_partly_loaded_server_is_ready(with_broken):
    client = ready_client(
        Settings(compile=False, models=with_broken, warmup=False, strict_readiness=False)
    )
    try:
        body = client.get("/ready").json()
        assert (body["ready"], body["status"]) == (True, "ready")
        assert list(body["detail"]["unavailable"]) == ["no-weights"]
        assert "error" not in body["detail"]
        assert ready_gauge(client) == 1
    finally:
        client.__exit__(None, None, None)
