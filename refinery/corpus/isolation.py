"""Parsing in worker processes, each file within a time budget that the parser cannot overrun.

A limit checked inside a parser holds only where the parser checks it; a catastrophic regex, a
quadratic tree operation or a loop inside a C extension does not stop when asked. So the file
is parsed in a worker process and the parent waits for the answer at most ``timeout_s``: past
it, the worker is killed (SIGKILL), the file is rejected as ``parse_timeout``, and a fresh
worker takes the next file. Workers also run under an address-space limit, so a parser that
tries to inflate a bomb fails with ``too_much_memory`` instead of swapping the machine.

Overhead stays small for many small files: the workers are long-lived (one start per run, not
per file), forked from a forkserver that has already imported the parsers (a replacement after
a kill starts in milliseconds), and requests and answers are raw bytes and JSON over a pipe
(nothing is unpickled from a process that handled untrusted input).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from refinery.core.lineage import sha256_hex
from refinery.core.processes import set_process_environment
from refinery.corpus.documents import (
    CorpusFile,
    DocumentRejected,
    ParsedDocument,
    ParseLimits,
    RejectReason,
    parse_bytes,
)

_PRELOAD = [
    "refinery.corpus.documents",
    "refinery.corpus.ocr",
    "bs4",
    "pypdf",
    "pypdf.filters",
    "PIL.Image",
    "pytesseract",
]


def _worker(conn: Connection, max_memory_mb: int) -> None:
    """Parse files sent over ``conn`` until it closes: header JSON, then the bytes."""
    import resource

    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Workers run side by side: one Tesseract thread each (OCR), instead of each taking all.
    set_process_environment({"OMP_THREAD_LIMIT": "1"})
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        file = CorpusFile(
            path=Path(header["source"]),
            source=header["source"],
            size_bytes=header["size_bytes"],
            modified_at=datetime.fromisoformat(header["modified_at"]),
        )
        try:
            doc = parse_bytes(file, data, ParseLimits(**header["limits"]))
            answer: dict[str, Any] = {
                "doc": {
                    "title": doc.title,
                    "format": doc.format,
                    "text": doc.text,
                    "meta": doc.meta,
                }
            }
        except DocumentRejected as err:
            answer = {"rejected": [err.reason.value, err.detail]}
        except MemoryError:
            answer = {
                "rejected": [
                    RejectReason.TOO_MUCH_MEMORY.value,
                    f"parsing needed more than the {max_memory_mb} MB a parser may use",
                ]
            }
        except Exception as err:  # noqa: BLE001 - a parser bug must reject the file, not the run
            answer = {
                "rejected": [RejectReason.PARSER_CRASHED.value, f"{type(err).__name__}: {err}"]
            }
        try:
            conn.send_bytes(json.dumps(answer).encode())
        except MemoryError:
            conn.send_bytes(
                json.dumps(
                    {"rejected": [RejectReason.TOO_MUCH_MEMORY.value, "the text is too large"]}
                ).encode()
            )


class ParserPool:
    """Parses files in a long-lived worker process, killed and replaced at each file's deadline.

    One worker: ingestion handles files one at a time, and a second process would only compete
    with the embedding model for the cores. Use as a context manager, or call ``close``."""

    def __init__(self, limits: ParseLimits | None = None):
        self.limits = limits or ParseLimits()
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs: harmless
        self._proc: Any = None
        self._conn: Connection | None = None
        self.started = 0  # workers started (1 + one per kill or crash)
        self.killed = 0

    def __enter__(self) -> ParserPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> Connection:
        if self._conn is None:
            parent, child = self._ctx.Pipe(duplex=True)
            self._proc = self._ctx.Process(
                target=_worker, args=(child, self.limits.max_memory_mb), daemon=True
            )
            self._proc.start()
            child.close()
            self._conn = parent
            self.started += 1
        return self._conn

    def _stop(self, kill: bool) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            conn.close()  # the worker sees EOF and exits
        if proc is not None:
            if kill:
                proc.kill()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def close(self) -> None:
        self._stop(kill=False)

    def parse(self, file: CorpusFile, data: bytes) -> ParsedDocument:
        """What ``parse_bytes`` returns, or ``DocumentRejected`` (with ``parse_timeout`` when the
        worker did not answer within the budget, ``parser_crashed`` when it died)."""
        header = json.dumps(
            {
                "source": file.source,  # relative, with its extension: the format
                "size_bytes": file.size_bytes,
                "modified_at": file.modified_at.isoformat(),
                "limits": self.limits.to_dict(),
            }
        ).encode()
        conn = self._start()
        try:
            conn.send_bytes(header)
            conn.send_bytes(data)
            ready = conn.poll(self.limits.timeout_s)
            raw = conn.recv_bytes() if ready else None
        except (EOFError, OSError, BrokenPipeError):
            code = self._proc.exitcode if self._proc is not None else None
            self._stop(kill=True)
            raise DocumentRejected(
                RejectReason.PARSER_CRASHED,
                f"the parser process died (exit code {code}) while reading this file",
            ) from None
        if raw is None:
            self._stop(kill=True)
            self.killed += 1
            raise DocumentRejected(
                RejectReason.PARSE_TIMEOUT,
                f"parsing took longer than {self.limits.timeout_s:g} s; the parser was stopped",
            )
        answer = json.loads(raw)
        if "rejected" in answer:
            reason, detail = answer["rejected"]
            raise DocumentRejected(RejectReason(reason), detail)
        doc = answer["doc"]
        return ParsedDocument(
            source=file.source,
            title=doc["title"],
            format=doc["format"],
            text=doc["text"],
            file_hash=sha256_hex(data),
            content_hash=sha256_hex(doc["text"]),
            size_bytes=len(data),
            modified_at=file.modified_at,
            meta=doc["meta"],
        )
