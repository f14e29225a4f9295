"""Write data/vision/imagenet_labels.txt: the 1,000 ImageNet-1k class names in class-index order
(WordNet's first lemma of each synset), for the labels of image documents.

The synset order and the synset → lemma table are read from the timm wheel's data files
(Apache-2.0), downloaded without installing it (timm needs torchvision, which must not be
installed beside the CPU torch). Run once: `python scripts/imagenet-labels.py`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "vision" / "imagenet_labels.txt"
INFO = "timm/data/_info/"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "timm==1.0.31", "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("timm-*.whl")
        with zipfile.ZipFile(wheel) as z:
            synsets = z.read(INFO + "imagenet_synsets.txt").decode().split()
            lemmas = dict(
                line.split("\t", 1)
                for line in z.read(INFO + "imagenet_synset_to_lemma.txt").decode().splitlines()
                if "\t" in line
            )
    names = [lemmas[s].split(",")[0].strip() for s in synsets]
    assert len(names) == 1000
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(names) + "\n")
    print(f"wrote {OUT} ({len(names)} names)")


if __name__ == "__main__":
    main()
