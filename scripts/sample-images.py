"""Write the sample corpus's image documents: a photographed notice (PNG) and a scanned
inspection record (a PDF whose pages are images, no text layer). They exist to show image
ingestion (OCR) end to end; rerun this to regenerate them (the text is the same each time; the PDF also records when it was made).

    .venv/bin/python scripts/sample-images.py
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"

NOTICE = [
    "APIARY NOTICE - Hillside Community Garden",
    "Bees at work: please keep 10 metres from the hives.",
    "Hive inspections: Saturdays 10:00 to 12:00, weather permitting.",
    "Visitors must wear a veil and stay behind the rope line.",
    "If you see a swarm, call the apiary keeper on 0161 555 0134.",
    "Do not leave sugary drinks open near the hives in late summer:",
    "wasps and robbing bees are drawn to them.",
]

RECORD = [
    [
        "HIVE INSPECTION RECORD - Hive 7 (National, double brood)",
        "Date: 14 May. Weather: 19 C, sunny, light wind.",
        "Queen seen: yes, marked blue. Eggs present: yes.",
        "Frames of brood: 7. Temper: calm. Stores: 2 frames of honey.",
        "Queen cells: 3 charged cells on frame 5 - colony preparing to swarm.",
        "Action: artificial swarm made (Pagden method), old queen moved.",
    ],
    [
        "Varroa: 4 mites on the sticky board over 7 days (low).",
        "Next visit: 21 May. Check that the new queen has emerged and mated.",
        "Added a super with drawn comb. Hive weight: 38 kg.",
    ],
]


def page(lines: list[str], width: int = 1400, size: int = 30) -> Image.Image:
    font = ImageFont.load_default(size=size)
    img = Image.new("L", (width, 80 + len(lines) * 2 * size), 255)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((40, 40 + i * 2 * size), line, fill=0, font=font)
    return img


def main() -> None:
    page(NOTICE).save(CORPUS / "apiary-notice-board.png", optimize=True)
    pages = [page(lines).convert("RGB") for lines in RECORD]
    out = io.BytesIO()
    pages[0].save(out, format="PDF", save_all=True, append_images=pages[1:], resolution=150)
    (CORPUS / "scanned-hive-inspection-record.pdf").write_bytes(out.getvalue())


if __name__ == "__main__":
    main()
