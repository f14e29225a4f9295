"""Images made here for the OCR tests: printed text rendered with Pillow's own font, a scanned
page (a PDF whose only content is such an image), and images that are broken on purpose."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont


def text_image(lines: list[str], *, width: int = 900, size: int = 30, fmt: str = "PNG") -> bytes:
    """A white page with ``lines`` printed in black, one per line; returns the encoded file."""
    font = ImageFont.load_default(size=size)
    img = Image.new("RGB", (width, 60 + len(lines) * int(size * 2)), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((30, 30 + i * int(size * 2)), line, fill="black", font=font)
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def line_top(index: int, size: int = 30) -> int:
    """Where ``text_image`` put line ``index`` (its top, in pixels)."""
    return 30 + index * int(size * 2)


def scanned_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with no text layer: each page is one image of printed lines, as a scanner makes."""
    images = [Image.open(io.BytesIO(text_image(lines))).convert("RGB") for lines in pages]
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=150)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` × ``height`` pixels (a decompression bomb's
    shape: the canvas is only claimed, so the file stays a few hundred bytes)."""
    small = io.BytesIO()
    Image.new("1", (8, 8)).save(small, format="PNG")
    data = bytearray(small.getvalue())
    # IHDR is the first chunk: 8-byte signature, length, "IHDR", width, height, ...
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def tiny_image_model(folder, steps: int = 20):
    """A class-conditioned diffusers model trained for ``steps`` steps on the digits (a few
    seconds): real weights and code paths, not a good model."""
    from pathlib import Path

    from training.images import ImageTrainingConfig, prepare_digits, train_class_conditioned

    folder = Path(folder)
    dataset = prepare_digits(folder.parent / "image-datasets")
    config = ImageTrainingConfig(max_steps=steps, batch_size=32, log_every=5, sample_steps=5)
    return train_class_conditioned(dataset, config, folder).folder
