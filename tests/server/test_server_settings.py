"""Settings: defaults, environment variables, overrides and bad values."""

import pytest

from denoised.server.settings import Settings, settings_from_env


def test_defaults_serve_loopback_port_8000():
    s = settings_from_env({})
    assert (s.host, s.port, s.models, s.batching) == ("127.0.0.1", 8000, (), "step")
    assert s.strict_readiness is True


def test_environment_parsed_to_each_settings_type(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n\n k2 \n")
    env = {
        "DENOISED_HOST": "0.0.0.0",
        "DENOISED_PORT": "9001",
        "DENOISED_MODELS": "/m/a, /m/b",
        "DENOISED_DEVICE": "cpu",
        "DENOISED_DTYPE": "float32",
        "DENOISED_MAX_BATCH": "7",
        "DENOISED_MAX_QUEUE": "3",
        "DENOISED_BATCHING": "request",
        "DENOISED_DRAIN_SECONDS": "2.5",
        "DENOISED_API_KEYS": "k0",
        "DENOISED_API_KEYS_FILE": str(keys),
        "DENOISED_METRICS_AUTH": "true",
        "DENOISED_STRICT_READINESS": "off",
    }
    s = settings_from_env(env)
    assert s.host == "0.0.0.0" and s.port == 9001
    assert s.models == ("/m/a", "/m/b")
    assert (s.device, s.dtype, s.max_batch, s.max_queue) == ("cpu", "float32", 7, 3)
    assert s.batching == "request" and s.drain_seconds == 2.5
    assert s.metrics_auth is True and s.strict_readiness is False
    assert s.all_api_keys() == ("k0", "k1", "k2")


def test_overrides_beat_environment_and_none_is_ignored():
    s = settings_from_env({"DENOISED_PORT": "9001"}, port=9100, host=None, models=["x"])
    assert s.port == 9100 and s.host == "127.0.0.1" and s.models == ("x",)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DENOISED_PORT": "eighty"}, "DENOISED_PORT"),
        ({"DENOISED_METRICS_AUTH": "maybe"}, "DENOISED_METRICS_AUTH"),
        ({"DENOISED_BATCHING": "static"}, "batching must be one of step, request"),
        ({"DENOISED_DEVICE": "tpu"}, "device must be one of"),
        ({"DENOISED_MAX_BATCH": "0"}, "max_batch"),
    ],
)
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(ValueError, match=message):
        settings_from_env(env)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="drain_seconds"):
        Settings(drain_seconds=0)
