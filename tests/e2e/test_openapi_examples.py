"""What the documentation shows works against `denoised serve` with the shipped defaults:
every request example in the live `/openapi.json` is answered 200, and the guidance a
response echoes is the guidance that was applied."""

import base64
import io

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def request_examples(schema: dict) -> list[tuple[str, dict]]:
    """(path, body) for every example of every POST body: whole-body examples as they are,
    a field's examples as a body of that field alone."""
    components = schema["components"]["schemas"]
    found = []
    for path, operations in schema["paths"].items():
        content = operations.get("post", {}).get("requestBody", {}).get("content", {})
        for media in content.values():
            body = components[media["schema"]["$ref"].rsplit("/", 1)[1]]
            found += [(path, example) for example in body.get("examples", [])]
            for name, field in body["properties"].items():
                found += [(path, {name: example}) for example in field.get("examples", [])]
    return found


def test_every_openapi_example_is_answered_200(shipped):
    examples = request_examples(httpx.get(shipped.url + "/openapi.json").json())
    paths = {path for path, _ in examples}
    assert paths == {"/v1/images/generations", "/v1/generate"}
    assert len(examples) >= 6  # two per body, and the field examples
    for path, body in examples:
        with httpx.stream("POST", shipped.url + path, json=body, timeout=60) as response:
            text = response.read().decode()
        assert response.status_code == 200, (path, body, text)
        if body.get("stream"):
            assert "event: error" not in text and "event: completed" in text, text[-500:]


def images(url: str, body: dict) -> tuple[float, np.ndarray]:
    """The guidance scale the response echoes, and its images."""
    response = httpx.post(url + "/v1/generate", json={**body, "output_format": "npy"}, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    files = [base64.b64decode(item["b64_json"]) for item in data["images"]]
    return data["guidance_scale"], np.stack([np.load(io.BytesIO(f)) for f in files])


def test_the_echoed_guidance_is_the_guidance_applied(shipped):
    card = httpx.get(shipped.url + "/v1/models/digits-dit").json()
    default = card["defaults"]["guidance_scale"]
    assert default != 1.0  # the shipped models guide by default
    base = {"model": "digits-dit", "steps": 8, "seed": 3}
    scale, unlabelled = images(shipped.url, base)
    assert scale == 1.0  # no label: nothing to guide toward
    np.testing.assert_array_equal(unlabelled, images(shipped.url, {**base, "guidance_scale": 1})[1])
    labelled = {**base, "label": "3"}
    scale, guided = images(shipped.url, labelled)
    assert scale == default
    explicit = images(shipped.url, {**labelled, "guidance_scale": default})[1]
    np.testing.assert_array_equal(guided, explicit)
    unguided = images(shipped.url, {**labelled, "guidance_scale": 1})[1]
    assert np.abs(guided - unguided).max() > 0.01
