"""image_url parts in requests: decoded within limits, read by OCR, refused with a reason."""

from __future__ import annotations

import asyncio
import base64

import pytest

from serving.images import (
    IMAGE_TEXT_HEADER,
    image_bytes,
    rag_image_text,
    resolve_images,
)
from serving.openai_schema import ApiError, ChatCompletionRequest, Limits
from tests.images import png_declaring, text_image


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def part(u: str) -> dict:
    return {"type": "image_url", "image_url": {"url": u}}


def code_of(fn, *args) -> str:
    with pytest.raises(ApiError) as err:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert err.value.status in (400, 501) and err.value.message
    return str(err.value.code)


def test_an_image_part_becomes_the_text_read_from_it_after_the_typed_text():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What does the sign say?"},
            part(url(text_image(["Keep 10 metres from the hives"]))),
        ]}]
    )  # fmt: skip
    assert asyncio.run(resolve_images(request.messages, Limits())) == 1
    (message,) = request.engine_item(Limits())["messages"]
    assert message["content"].startswith(
        f"What does the sign say?\n\n{IMAGE_TEXT_HEADER}\nKeep 10 metres from the hives"
    )  # then the labels a vision model is sure enough of, if any


def test_a_photo_part_brings_what_a_vision_model_sees():
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, format="PNG")
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Where is this?"},
                                               part(url(buf.getvalue()))]}]
    )  # fmt: skip
    asyncio.run(resolve_images(request.messages, Limits()))
    content = request.engine_item(Limits())["messages"][0]["content"]
    assert "Image labels: palace (" in content


def test_an_image_without_text_says_so():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe it"},
                                               part(url(text_image([])))]}]
    )  # fmt: skip
    asyncio.run(resolve_images(request.messages, Limits()))
    assert "(no text found in the image)" in request.engine_item(Limits())["messages"][0]["content"]


def test_bad_image_parts_are_refused_with_a_reason():
    limits = Limits()
    assert code_of(image_bytes, "https://example.com/x.png", limits) == "remote_image_refused"
    assert code_of(image_bytes, "data:text/plain;base64,aGk=", limits) == "invalid_image"
    assert code_of(image_bytes, "data:image/png;base64,@@@", limits) == "invalid_image"
    assert code_of(image_bytes, 42, limits) == "invalid_image"
    big = url(b"\x89PNG" + b"\0" * 800_000)
    assert code_of(image_bytes, big, limits) == "image_too_large"

    def chat(*parts: dict):
        request = ChatCompletionRequest(
            messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}]
        )
        return resolve_images(request.messages, limits)

    assert code_of(chat, part(url(png_declaring(20_000, 20_000)))) == "image_too_large"
    assert code_of(chat, part(url(b"not an image at all"))) == "invalid_image"
    png = text_image(["x"])
    assert code_of(chat, part(url(png[: len(png) // 2]))) == "invalid_image"
    assert code_of(chat, *[part(url(png))] * 5) == "too_many_images"
    assert code_of(rag_image_text, [{"type": "text", "text": "x"}], limits) == "invalid_image"
    # Unknown part types are still refused when the message is read.
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    )
    assert code_of(request.engine_item, limits) == "unsupported_content"


def test_without_ocr_images_are_refused_as_unsupported_by_this_server(monkeypatch):
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n: None if n == "tesseract" else real(n))
    with pytest.raises(ApiError) as err:
        asyncio.run(rag_image_text([part(url(text_image(["x"])))], Limits()))
    assert err.value.status == 501 and err.value.code == "images_unsupported"
