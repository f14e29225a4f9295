"""Images as documents: PNG, JPEG and WebP files, and PDF pages without a text layer, read by
OCR (Debian's Tesseract through pytesseract) into text with the region each line came from.

Every image is checked before it is decoded: the format must be one of the three (and the one
its name says), its pixel count under ``ParseLimits.max_image_pixels`` (a decompression bomb
declares a huge canvas in a small file), and it must decode whole (a truncated file is
rejected, not half-read). Tesseract runs as a child process under the parser worker's memory
limit and its own deadline, below the worker's, so it cannot outlive the file's budget.
"""

from __future__ import annotations

import io
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from refinery.corpus.documents import DocumentRejected, ParseLimits, RejectReason, normalize_text

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_PIL_FORMATS = ["PNG", "JPEG", "WEBP"]
# Tesseract reads small print badly: lines are upscaled to about this many pixels high.
_MIN_SIDE = 600
_MIN_CONFIDENCE = 30  # Tesseract's word confidence (0-100): below, the word is noise


@dataclass(frozen=True)
class OcrLine:
    text: str
    box: tuple[int, int, int, int]  # left, top, width, height in the image's own pixels
    confidence: float  # mean word confidence, 0-1


def ocr_available() -> bool:
    return shutil.which("tesseract") is not None


def ocr_engine() -> str:
    """Name and version of the OCR engine, for lineage ("tesseract 5.3.0")."""
    import pytesseract

    try:
        return f"tesseract {pytesseract.get_tesseract_version()}"
    except (pytesseract.TesseractNotFoundError, OSError):
        return "tesseract (not installed)"


def open_image(data: bytes, limits: ParseLimits, expected: str | None = None) -> Any:
    """The decoded image (Pillow), or ``DocumentRejected`` saying what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DocumentRejected(RejectReason.EMPTY, "the image file is empty")
    try:
        with _HEADER_LOCK, _own_pixel_check():  # only the header is read in here
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise DocumentRejected(
                RejectReason.DECOMPRESSION_BOMB,
                f"{w}×{h} pixels declared in a {len(data) / 1e3:.0f} KB file; "
                f"the limit is {limits.max_image_pixels:,} pixels",
            )
        if expected is not None and img.format != expected:
            raise DocumentRejected(
                RejectReason.WRONG_TYPE,
                f"the file is a {img.format} image but its name says {expected}",
            )
        img.load()
    except DocumentRejected:
        raise
    except Image.DecompressionBombError as err:
        raise DocumentRejected(RejectReason.DECOMPRESSION_BOMB, str(err)) from err
    except UnidentifiedImageError as err:
        raise DocumentRejected(
            RejectReason.CORRUPT_IMAGE, "not a PNG, JPEG or WebP image (unrecognised content)"
        ) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # Pillow says "image file is truncated" / "broken data stream" for cut-off files.
        raise DocumentRejected(RejectReason.CORRUPT_IMAGE, f"unreadable image: {err}") from err
    except MemoryError as err:
        raise DocumentRejected(
            RejectReason.TOO_MUCH_MEMORY, "the image needs more memory than a parser may use"
        ) from err
    return img


# Pillow's limit is a module global: threads reading headers at once (the service reads request
# images in threads) take turns, so that none restores another's setting.
_HEADER_LOCK = threading.Lock()


class _own_pixel_check:
    """Pillow's bomb check off while the header is read (a module global): ours follows at once,
    before any pixel is decoded, at our limit and naming the declared size."""

    def __enter__(self) -> None:
        from PIL import Image

        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self.saved


def ocr_lines(img: Any, timeout_s: float) -> list[OcrLine]:
    """Lines of text Tesseract finds in ``img``, top to bottom, with their boxes; lines with
    neither a letter nor a digit are left out."""
    import pytesseract
    from PIL import Image, ImageOps

    if not ocr_available():
        raise DocumentRejected(
            RejectReason.OCR_UNAVAILABLE,
            "no OCR engine: install Debian's tesseract-ocr (scripts/system-deps.sh does)",
        )
    gray = ImageOps.exif_transpose(img).convert("L")
    scale = max(1.0, _MIN_SIDE / max(1, min(gray.size)))
    if scale > 1.0:
        gray = gray.resize(
            (round(gray.width * scale), round(gray.height * scale)), Image.Resampling.LANCZOS
        )
    try:
        data = pytesseract.image_to_data(
            gray, output_type=pytesseract.Output.DICT, timeout=timeout_s
        )
    except RuntimeError as err:  # pytesseract's timeout
        raise DocumentRejected(
            RejectReason.PARSE_TIMEOUT, f"OCR took longer than {timeout_s:g} s"
        ) from err
    except pytesseract.TesseractError as err:
        raise DocumentRejected(RejectReason.CORRUPT_IMAGE, f"OCR failed: {err}") from err
    lines: dict[tuple[int, int, int], list[int]] = {}
    for i, word in enumerate(data["text"]):
        if word.strip() and float(data["conf"][i]) >= _MIN_CONFIDENCE:
            key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            lines.setdefault(key, []).append(i)
    out = []
    for idx in lines.values():
        words = [data["text"][i].strip() for i in idx]
        if not any(c.isalnum() for word in words for c in word):
            continue  # "®", "|", "—": what Tesseract reads in the edges of a photo
        left = min(data["left"][i] for i in idx)
        top = min(data["top"][i] for i in idx)
        right = max(data["left"][i] + data["width"][i] for i in idx)
        bottom = max(data["top"][i] + data["height"][i] for i in idx)
        box = (round(left / scale), round(top / scale),
               round((right - left) / scale), round((bottom - top) / scale))  # fmt: skip
        out.append(
            OcrLine(
                text=normalize_text(" ".join(words)),
                box=box,
                confidence=sum(float(data["conf"][i]) for i in idx) / len(idx) / 100,
            )
        )
    out.sort(key=lambda line: (line.box[1], line.box[0]))
    return out


def lines_text(lines: list[OcrLine], page: int = 1) -> tuple[str, list[dict[str, Any]]]:
    """The lines as one text (a line per line), and a region record per line with the span of
    characters it became, so a chunk can say where on which page its text was."""
    parts: list[str] = []
    regions: list[dict[str, Any]] = []
    offset = 0
    for line in lines:
        if parts:
            offset += 1
        regions.append(
            {
                "page": page,
                "box": list(line.box),
                "confidence": round(line.confidence, 3),
                "chars": [offset, offset + len(line.text)],
            }
        )
        parts.append(line.text)
        offset += len(line.text)
    return "\n".join(parts), regions


def image_document(data: bytes, suffix: str, limits: ParseLimits) -> tuple[str, dict[str, Any]]:
    """Text and metadata of an image file (``suffix`` such as ".png")."""
    img = open_image(data, limits, IMAGE_SUFFIXES[suffix.lower()])
    lines = ocr_lines(img, timeout_s=limits.ocr_timeout_s)
    text, regions = lines_text(lines)
    if not text.strip():
        raise DocumentRejected(RejectReason.NO_TEXT, "OCR found no text in the image")
    return text, {
        "image": {"format": img.format, "width": img.width, "height": img.height},
        "ocr": {"engine": "tesseract", "regions": regions},
        "pages": [[0, len(text)]],
    }
