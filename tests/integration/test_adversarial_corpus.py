"""A corpus salted with hostile files ingests in bounded time: every good document is kept,
every bad one is in the rejected-files ledger with its reason, and the run goes on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from refinery.corpus.documents import ParseLimits
from refinery.ingestion.sync import sync_documents
from tests.adversarial import write_adversarial
from tests.conftest import SAMPLE_CORPUS

pytestmark = pytest.mark.integration

# Appends a line every 2 ms until killed: a file that is still being written.
WRITER = """
import sys, time
with open(sys.argv[1], "a") as fh:
    while True:
        fh.write("another line of a file that is still being copied\\n")
        fh.flush()
        time.sleep(0.002)
"""


@pytest.mark.timeout(600)
def test_hostile_files_are_rejected_with_their_reason_and_good_ones_kept(store, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    good = sorted(p.name for p in SAMPLE_CORPUS.iterdir())
    expected = write_adversarial(corpus)
    growing = corpus / "zz-still-being-written.md"
    growing.write_text("# Copy in progress\n\n")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(growing)])
    try:
        size = growing.stat().st_size
        while growing.stat().st_size < size + 500:  # it is writing
            time.sleep(0.01)
        result = sync_documents(store, corpus, limits=ParseLimits(timeout_s=10))
    finally:
        writer.kill()
        writer.wait()
    expected[growing.name] = "changed_while_reading"

    indexed = set(store.document_states(result.corpus))
    ledger = {r["path"]: r for r in store.rejections(result.corpus)}
    assert indexed == set(good)
    assert {name: ledger[name]["reason"] for name in expected} == expected
    assert set(ledger) == set(expected)
    assert all(r["detail"] for r in ledger.values())
    assert result.documents == len(good)
    assert result.rejected == len(expected)
    assert result.parser_restarts == 1  # the worker killed at slow.pdf's deadline, replaced

    # Once the copy has finished, the next run reads it; the ledger forgets it.
    again = sync_documents(store, corpus, only=[growing.name])
    assert again.new == 1
    assert growing.name in store.document_states(result.corpus)
    assert growing.name not in {r["path"] for r in store.rejections(result.corpus)}
