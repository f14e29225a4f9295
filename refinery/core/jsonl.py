"""JSON Lines input: one object per line, bad lines counted rather than fatal."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any


def json_objects(lines: Iterable[str], dropped: Counter[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects on the non-blank lines, in order. A line that is not JSON counts as
    ``malformed_json`` in ``dropped``, one that is JSON but not an object as ``not_an_object``."""
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped["malformed_json"] += 1
            continue
        if not isinstance(row, dict):
            dropped["not_an_object"] += 1
            continue
        yield row
