"""The official OpenAI Python SDK against a real server: `images.generate`, plain and
streamed. The stream must parse into the SDK's own event types with every field filled in,
and its final image must be the one a plain request with the same seed returns. OpenAI's
`partial_images` must send that many previews, the ones `preview` sends at those evaluations."""

import base64
import io
import math

import httpx
import openai
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image
from serving_helpers import read_events

pytestmark = pytest.mark.e2e

PARTIAL, COMPLETED = "image_generation.partial_image", "image_generation.completed"


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


def png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


def test_stream_gives_a_partial_image_per_evaluation_then_the_final_image(sdk):
    fields = {"sampler": "heun", "steps": 3, "seed": 11}
    plain = sdk.images.generate(prompt="3", model="tiny-dit", extra_body=fields)
    stream = sdk.images.generate(
        prompt="3", model="tiny-dit", stream=True, extra_body={**fields, "preview": True}
    )
    events = list(stream)
    nfe = 2 * 3 - 1  # Heun: two evaluations per step, one on the last
    kinds = [type(event) for event in events]
    assert kinds == [ImageGenPartialImageEvent] * nfe + [ImageGenCompletedEvent]
    partials, completed = events[:-1], events[-1]
    assert [e.partial_image_index for e in partials] == list(range(nfe))
    for event in partials:
        assert event.type == PARTIAL and event.output_format == "png" and event.size == "8x8"
        assert png_size(event.b64_json) == (8, 8)
        assert event.created_at > 0 and event.background and event.quality
    assert completed.type == COMPLETED
    assert completed.b64_json == plain.data[0].b64_json  # same seed, same image
    assert (completed.size, completed.output_format) == ("8x8", "png")
    assert completed.usage.total_tokens == 0 and completed.usage.input_tokens_details is not None
    extra = completed.model_extra  # our fields ride along
    assert (extra["seed"], extra["nfe"], extra["index"]) == (11, nfe, 0)
    assert extra["id"] == partials[0].model_extra["id"]


def test_stream_without_previews_sends_one_completed_event_per_image(sdk):
    stream = sdk.images.generate(
        prompt="7", model="tiny-flow", n=2, stream=True, extra_body={"steps": 2, "seed": 3}
    )
    events = list(stream)
    assert [type(e) for e in events] == [ImageGenCompletedEvent] * 2
    assert [e.model_extra["index"] for e in events] == [0, 1]
    assert all(png_size(e.b64_json) == (8, 8) for e in events)
    assert events[0].b64_json != events[1].b64_json


def partials_and_completed(events: list) -> tuple[list, list]:
    """The stream's partial images and completed images; every partial comes first."""
    kinds = [type(event) for event in events]
    count = kinds.count(ImageGenPartialImageEvent)
    assert kinds == [ImageGenPartialImageEvent] * count + [ImageGenCompletedEvent] * (
        len(events) - count
    )
    return events[:count], events[count:]


def test_partial_images_are_the_previews_at_evenly_spaced_evaluations(sdk):
    fields = {"sampler": "ddim", "steps": 10, "seed": 5}  # ddim: one evaluation per step
    every = list(
        sdk.images.generate(
            prompt="3", model="tiny-dit", stream=True, extra_body={**fields, "preview": True}
        )
    )
    by_step = {e.model_extra["step"]: e.b64_json for e in partials_and_completed(every)[0]}
    assert sorted(by_step) == list(range(1, 11))
    events = list(
        sdk.images.generate(
            prompt="3", model="tiny-dit", stream=True, partial_images=2, extra_body=fields
        )
    )
    partials, completed = partials_and_completed(events)
    assert [e.partial_image_index for e in partials] == [0, 1] and len(completed) == 1
    # 10 evaluations in 3 equal parts: partial image i after evaluation ceil((i + 1) * 10 / 3)
    steps = [e.model_extra["step"] for e in partials]
    assert steps == [math.ceil((i + 1) * 10 / 3) for i in range(2)] == [4, 7]
    assert [e.b64_json for e in partials] == [by_step[4], by_step[7]]
    assert all(e.type == PARTIAL and png_size(e.b64_json) == (8, 8) for e in partials)
    assert completed[0].b64_json == every[-1].b64_json  # partial images change no pixel


def test_partial_images_are_at_most_one_per_evaluation_and_zero_means_none(sdk):
    fields = {"sampler": "euler", "steps": 2, "seed": 8}
    for asked, steps in ((3, [1, 2]), (1, [1]), (0, [])):
        events = list(
            sdk.images.generate(
                prompt="5", model="tiny-flow", stream=True, partial_images=asked, extra_body=fields
            )
        )
        partials, completed = partials_and_completed(events)
        assert [e.model_extra["step"] for e in partials] == steps
        assert [e.partial_image_index for e in partials] == list(range(len(steps)))
        assert len(completed) == 1


def test_partial_images_of_several_images_show_the_first(sdk):
    fields = {"sampler": "ddim", "steps": 4, "seed": 21}
    one = list(
        sdk.images.generate(
            prompt="6", model="tiny-dit", stream=True, partial_images=1, extra_body=fields
        )
    )
    two = list(
        sdk.images.generate(
            prompt="6", model="tiny-dit", n=2, stream=True, partial_images=1, extra_body=fields
        )
    )
    (partial,), completed = partials_and_completed(two)
    assert partial.b64_json == partials_and_completed(one)[0][0].b64_json  # image 0's preview
    assert [e.model_extra["index"] for e in completed] == [0, 1]
    assert completed[0].b64_json == one[-1].b64_json != completed[1].b64_json


def test_partial_images_need_a_stream_and_exclude_preview(sdk):
    with pytest.raises(openai.UnprocessableEntityError, match="stream: true") as raised:
        sdk.images.generate(prompt="3", model="tiny-dit", partial_images=2)
    assert raised.value.body["param"] == "partial_images"
    with pytest.raises(openai.UnprocessableEntityError, match="not both") as raised:
        sdk.images.generate(prompt="3", stream=True, partial_images=2, extra_body={"preview": True})
    assert raised.value.body["param"] == "partial_images"
    plain = sdk.images.generate(prompt="3", model="tiny-dit", partial_images=0)
    assert len(plain.data) == 1  # 0 (none) needs no stream


def test_errors_reach_the_sdk_before_and_during_the_stream(sdk):
    with pytest.raises(openai.UnprocessableEntityError, match="cat"):
        sdk.images.generate(prompt="cat", model="tiny-dit", stream=True)
    late = {"steps": 50, "timeout": 1e-6}  # admitted, then ended by its deadline
    with pytest.raises(openai.APIError, match="timeout") as raised:
        list(sdk.images.generate(prompt="1", model="tiny-dit", stream=True, extra_body=late))
    assert raised.value.body["code"] == 504


def test_wire_event_names_equal_their_type_field(server):
    body = {"prompt": "2", "steps": 2, "stream": True, "preview": True}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    assert [name for name, _ in events] == [PARTIAL, PARTIAL, COMPLETED]
    assert all(data["type"] == name for name, data in events)
    openai_fields = {"b64_json", "background", "created_at", "output_format", "quality", "size"}
    assert openai_fields | {"partial_image_index"} <= set(events[0][1])
    assert openai_fields | {"usage"} <= set(events[-1][1])
