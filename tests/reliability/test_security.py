"""Security against real servers: API keys from the environment and from a file (health and
readiness open, metrics configurable), CORS off unless origins are named, request ids in
every error and log line, and model loading that refuses pickles, corrupt weights and paths
outside the configured model roots while the other models keep serving."""

import json
import pickle
import re
import shutil
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

ENV_KEY, FILE_KEY = "env-key-0123456789", "file-key-abcdefghij"
APP_ORIGIN = "http://app.example"
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ \[(\S+)\]: ")


@pytest.fixture(scope="module")
def keyed(launch_env, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"\n{FILE_KEY}\n\n")
    env = {
        "DENOISED_API_KEYS": ENV_KEY,
        "DENOISED_API_KEYS_FILE": str(keys),
        "DENOISED_METRICS_AUTH": "true",
        "DENOISED_CORS_ORIGINS": APP_ORIGIN,
    }
    return launch_env(env)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_health_and_ready_are_open_everything_else_needs_a_key(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ready").status_code == 200
    body = {"model": "tiny-dit", "steps": 2}
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path, headers=bearer(FILE_KEY)).status_code == 200
    refused = [
        {},
        bearer("wrong"),
        bearer(ENV_KEY[:-1]),  # a prefix of a key
        bearer(ENV_KEY + "x"),
        {"authorization": ENV_KEY},  # no scheme
        {"authorization": f"Basic {ENV_KEY}"},
        {"x-api-key": ENV_KEY},
    ]
    for headers in refused:
        response = httpx.post(keyed.url + "/v1/generate", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["request_id"] == response.headers["x-request-id"]
        assert ENV_KEY not in response.text and FILE_KEY not in response.text
    for key in (ENV_KEY, FILE_KEY):
        response = httpx.post(keyed.url + "/v1/generate", json=body, headers=bearer(key))
        assert response.status_code == 200, response.text


def test_cors_only_for_the_named_origin(keyed, launch):
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}  # fmt: skip
    allowed = httpx.options(keyed.url + "/v1/generate", headers={"origin": APP_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert allowed.headers["x-request-id"].startswith("req_")
    other = httpx.options(
        keyed.url + "/v1/generate", headers={"origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(keyed.url + "/health", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_is_off_by_default(partly_broken):
    server = partly_broken
    preflight = {"origin": APP_ORIGIN, "access-control-request-method": "POST"}
    response = httpx.options(server.url + "/v1/generate", headers=preflight)
    assert response.status_code == 405
    assert not [h for h in response.headers if h.startswith("access-control-")]
    plain = httpx.get(server.url + "/v1/models", headers={"origin": APP_ORIGIN})
    assert plain.status_code == 200
    assert not [h for h in plain.headers if h.startswith("access-control-")]


def test_every_log_line_names_its_request(keyed):
    chosen = "trace-me-42"
    ok = httpx.post(keyed.url + "/v1/generate", headers={**bearer(ENV_KEY), "x-request-id": chosen},
                    json={"model": "tiny-flow", "steps": 2})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["id"] == chosen
    bad = httpx.post(keyed.url + "/v1/generate", headers=bearer(ENV_KEY), json={"n": -1})
    bad_id = bad.json()["error"]["request_id"]
    lines = [line for line in keyed.output().splitlines() if STAMP.match(line)]
    assert lines
    access = [line for line in lines if "uvicorn.access" in line]
    assert access and all(STAMP.match(line).group(1).startswith(("req_", "trace-"))
                          for line in access)  # fmt: skip
    ours = [line for line in lines if chosen in line]
    assert any("denoised.engine" in line and " ok: " in line for line in ours)
    assert any("uvicorn.access" in line and '"POST /v1/generate' in line for line in ours)
    assert any(f"[{bad_id}]" in line and " 422" in line for line in lines)


def _copy_model(source: str, target: Path) -> Path:
    """A served copy of a tiny model under a new name (so serving it would show)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "name": target.name}))
    return target


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def partly_broken(launch_env, model_dirs, tmp_path_factory):
    """Model roots configured, readiness not strict, and besides the two tiny models: corrupt
    weights, a pickle (which would create the file `unpickled` if loaded), a directory
    reached through `..` outside the roots, and weights linked to outside the roots."""
    tiny = model_dirs[0]
    base = tmp_path_factory.mktemp("model-roots")
    root, outside = base / "root", base / "outside"
    corrupt = _copy_model(tiny, root / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = root / "pickled"
    pickled.mkdir(parents=True)
    shutil.copy(Path(tiny) / "config.json", pickled / "config.json")
    (pickled / "model.pt").write_bytes(pickle.dumps(_Marker(base / "unpickled")))
    escaped = _copy_model(tiny, outside / "escaped")
    linked = _copy_model(tiny, root / "linked")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(escaped / "model.safetensors")
    server = launch_env(
        {"DENOISED_MODEL_ROOTS": f"{Path(tiny).parent},{root}"},
        "--no-strict-readiness",  # ready with the good models: the test uses them
        *("--model", str(corrupt), "--model", str(pickled)),
        *("--model", str(root / ".." / "outside" / "escaped"), "--model", str(linked)),
    )
    server.marker = base / "unpickled"
    return server


def test_bad_models_stay_unavailable_and_the_rest_serve(partly_broken):
    server = partly_broken
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["models"] == ["tiny-dit", "tiny-flow"]
    reasons = ready["detail"]["unavailable"]
    assert set(reasons) == {"corrupt", "pickled", "escaped", "linked"}
    assert "not a valid safetensors file" in reasons["corrupt"]
    assert "pickle checkpoint" in reasons["pickled"]
    assert "outside the model roots" in reasons["escaped"]
    assert "outside its model directory" in reasons["linked"]
    assert not server.marker.exists(), "a pickle was unpickled"

    listed = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert listed == ["tiny-dit", "tiny-flow"]
    for name in reasons:
        response = httpx.post(server.url + "/v1/generate", json={"model": name, "steps": 2})
        assert response.status_code == 503
        assert "failed to load" in response.json()["error"]["message"]
        assert response.json()["error"]["param"] == "model"
    served = httpx.post(server.url + "/v1/generate", json={"model": "tiny-flow", "steps": 2})
    assert served.status_code == 200
