"""Images in requests: OpenAI-style ``image_url`` content parts carrying ``data:`` URLs.

The service fetches nothing: a remote URL is refused. An image is decoded within limits
(bytes, then pixels before any pixel is decoded) and read by OCR (the same Tesseract path as
image documents at ingestion) and by an ImageNet classifier (its likely labels); that text then
stands in the prompt, and in the retrieval query for RAG, marked as coming from the image. So the prompt guard screens it like typed text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from typing import Any

from serving.openai_schema import ApiError, ChatMessage, Limits

log = logging.getLogger("refinery.images")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,", re.IGNORECASE)
OCR_TIMEOUT_S = 10.0
IMAGE_TEXT_HEADER = "[Text read from the attached image]"


def _bad(message: str, code: str = "invalid_image", param: str = "messages") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def image_bytes(url: Any, limits: Limits, param: str = "messages") -> bytes:
    """The bytes of an image given as a ``data:`` URL, or a 400 that says what is wrong."""
    if not isinstance(url, str):
        raise _bad("image_url.url must be a string (a data: URL)", param=param)
    if not url.startswith("data:"):
        raise _bad(
            "image URLs must be data: URLs (base64); this service does not fetch remote images",
            code="remote_image_refused",
            param=param,
        )
    match = _DATA_URL.match(url)
    if match is None:
        raise _bad(
            "expected data:image/png, image/jpeg or image/webp with ;base64, before the data",
            param=param,
        )
    encoded = url[match.end() :]
    if len(encoded) > (limits.max_image_bytes * 4) // 3 + 4:
        raise _bad(
            f"the image is larger than {limits.max_image_bytes:,} bytes",
            code="image_too_large",
            param=param,
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"the image is not valid base64: {err}", param=param) from err


def image_text(data: bytes, limits: Limits, param: str = "messages") -> str:
    """OCR text of one image (may be empty), or a 400 naming what is wrong with the image."""
    from refinery.corpus.documents import DocumentRejected, ParseLimits, RejectReason
    from refinery.corpus.ocr import lines_text, ocr_available, ocr_lines, open_image

    if not ocr_available():
        raise ApiError(
            501,
            "this service cannot read images: no OCR engine (tesseract-ocr) is installed",
            type="server_error",
            param=param,
            code="images_unsupported",
        )
    try:
        img = open_image(data, ParseLimits(max_image_pixels=limits.max_image_pixels))
        text, _ = lines_text(ocr_lines(img, timeout_s=OCR_TIMEOUT_S))
    except DocumentRejected as err:
        code = {
            RejectReason.DECOMPRESSION_BOMB: "image_too_large",
            RejectReason.PARSE_TIMEOUT: "image_too_slow",
        }.get(err.reason, "invalid_image")
        raise _bad(f"bad image: {err.detail}", code=code, param=param) from err
    seen = image_labels(img)
    return f"{text}\n{seen}" if text.strip() and seen else text or seen


@functools.cache
def vision_model() -> Any:
    """The ImageNet classifier for image parts, or None (its package missing): loaded once per
    process, at the entry's start-up (``Refinery._load``), from a safetensors copy of the
    packaged weights made once per machine."""
    import tempfile
    from pathlib import Path

    from refinery.vision.classifier import load_optional

    model, error = load_optional(Path(tempfile.gettempdir()) / "refinery-vision")
    if error:
        log.warning("labels of image parts are off: %s", error)
    return model


def image_labels(img: Any) -> str:
    """What an ImageNet classifier sees in the image ("Image labels: palace (0.50), …"), or ""
    when nothing is likely enough or no vision model could load."""
    from refinery.vision.classifier import labels_text

    model = vision_model()
    return "" if model is None else labels_text(model.describe([img], k=3)[0].labels)


def with_image_text(text: str, image_texts: list[str]) -> str:
    """``text`` followed by what was read from each image, marked as such."""
    blocks = [text] if text.strip() else []
    for found in image_texts:
        blocks.append(f"{IMAGE_TEXT_HEADER}\n{found.strip() or '(no text found in the image)'}")
    return "\n\n".join(blocks)


def _image_urls(parts: list[dict[str, Any]]) -> list[Any]:
    urls = []
    for part in parts:
        if part.get("type") == "image_url":
            ref = part.get("image_url")
            urls.append(ref.get("url") if isinstance(ref, dict) else ref)
    return urls


async def resolve_images(messages: list[ChatMessage], limits: Limits) -> int:
    """Replace every image_url part by a text part with what OCR read from it (in a thread:
    OCR takes ~0.5 s of CPU). Returns how many images were read."""
    work: list[tuple[ChatMessage, list[Any]]] = []
    for message in messages:
        if isinstance(message.content, list):
            urls = _image_urls(message.content)
            if urls:
                work.append((message, urls))
    total = sum(len(urls) for _, urls in work)
    if total > limits.max_images:
        raise _bad(f"{total} images; at most {limits.max_images} per request", "too_many_images")
    for message, urls in work:
        blobs = [image_bytes(url, limits) for url in urls]  # cheap checks first, then OCR
        texts = [await asyncio.to_thread(image_text, blob, limits) for blob in blobs]
        assert isinstance(message.content, list)
        typed = [p for p in message.content if p.get("type") != "image_url"]
        own = "\n".join(p["text"] for p in typed if isinstance(p.get("text"), str))
        rest = [p for p in typed if not isinstance(p.get("text"), str) or p.get("type") != "text"]
        message.content = [{"type": "text", "text": with_image_text(own, texts)}, *rest]
    return total


async def rag_image_text(images: list[dict[str, Any]] | None, limits: Limits) -> list[str]:
    """What OCR read from the images of a /rag request (OpenAI-style content parts)."""
    if not images:
        return []
    if len(images) > limits.max_images:
        raise _bad(
            f"{len(images)} images; at most {limits.max_images} per request",
            "too_many_images",
            param="images",
        )
    urls = _image_urls(images)
    if len(urls) != len(images):
        raise _bad(
            'each item of images must be {"type": "image_url", "image_url": {"url": "data:..."}}',
            param="images",
        )
    blobs = [image_bytes(url, limits, param="images") for url in urls]
    return [await asyncio.to_thread(image_text, blob, limits, "images") for blob in blobs]
