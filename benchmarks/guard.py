"""Injection screens and parser isolation, measured side by side with what they replaced.

1. The prompt guard on the untouched test split of ``data/guard/prompts`` (and on the earlier
   held-out set ``data/guard/labeled.jsonl``): heuristics alone, the classifier alone, both;
   the previous guard (regexes + nearest-neighbour scorer, loaded from git) on the same rows.
2. The document screen on the test split of ``data/guard/documents`` plus the test share of
   the sample corpus; every sample document screened whole; every chunk of the sample corpus
   (as ingestion chunks it) screened as RAG screens retrieved chunks.
3. The existing prompt set: the 60 questions of ``data/eval/rag_questions.jsonl`` (benign)
   through the guard.
4. Parsing the sample corpus in this process vs in the worker pool (time budget enforced):
   the overhead; and the old HTML walk vs the new one on nested <div>s.
"""

from __future__ import annotations

import json
import subprocess
import time
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, machine, median
from refinery.core.settings import REPO_ROOT

BASELINE_COMMIT = "237b744"  # the last commit with the nearest-neighbour guard and old parser


def _old_module(path: str, name: str) -> types.ModuleType:
    """A module as it was at BASELINE_COMMIT (read with git show), for a same-run baseline."""
    source = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:{path}"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(name)
    module.__file__ = str(REPO_ROOT / path)
    import sys

    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, str(REPO_ROOT / path), "exec"), module.__dict__)
    return module


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _row(name: str, figures: dict[str, float]) -> str:
    return f"| {name} | {_pct(figures['recall'])} | {_pct(figures['false_positive_rate'])} |"


def _by_category(path: Path, blocked: np.ndarray) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[bool]] = {}
    for row, b in zip(rows, blocked, strict=True):
        cat = row["category"].split("-")[0] if row["label"] == "injection" else row["category"]
        groups.setdefault((row["label"], cat), []).append(bool(b))
    out = []
    for (label, cat), values in sorted(groups.items()):
        share = sum(values) / len(values)
        what = "blocked" if label == "injection" else "refused (false positives)"
        out.append(f"| {label} | {cat} | {len(values)} | {sum(values)} {what} ({_pct(share)}) |")
    return out


def prompt_guard(embedder: Any) -> tuple[list[str], dict[str, Any]]:
    from evaluation.guard import measure
    from refinery.safety.guard import GUARD_DIR, InjectionGuard, heuristic_reasons
    from refinery.safety.screening import load_labeled

    guard = InjectionGuard(embedder.encode)
    old = _old_module("serving/guard.py", "refinery_old_guard")
    old_guard = old.InjectionGuard(embedder.encode)
    lines: list[str] = []
    figures: dict[str, Any] = {}
    for label, path in [
        ("prompts test split", GUARD_DIR / "prompts" / "test.jsonl"),
        ("earlier held-out set (labeled.jsonl)", GUARD_DIR / "labeled.jsonl"),
    ]:
        m = measure(guard, path)
        texts, y = load_labeled(path)
        old_pred = np.asarray([v.blocked for v in old_guard.check(texts)])
        old_fig = {
            "recall": float(old_pred[y].mean()),
            "false_positive_rate": float(old_pred[~y].mean()),
        }
        figures[label] = {**{k: m[k] for k in ("heuristics", "classifier", "both")}, "old": old_fig}
        lines += [
            f"**{label}**: {m['injections']} injections, {m['benign']} benign prompts.",
            "",
            "| screen | recall | false-positive rate |",
            "|---|---|---|",
            _row("heuristics alone", m["heuristics"]),
            _row("classifier alone", m["classifier"]),
            _row("**both (what the service runs)**", m["both"]),
            _row("previous guard (regexes + nearest neighbours, same rows)", old_fig),
            "",
        ]
        if path.parent.name == "prompts":
            blocked = np.asarray([bool(heuristic_reasons(t)) for t in texts]) | (
                guard.scores(texts) > guard.threshold
            )
            lines += ["| label | category | rows | outcome |", "|---|---|---|---|"]
            lines += [*_by_category(path, blocked), ""]
        lines += [
            f"Missed: {json.dumps(m['missed'], ensure_ascii=False)}",
            "",
            f"Refused although benign: {json.dumps(m['false_positives'], ensure_ascii=False)}",
            "",
        ]
    questions = [
        json.loads(line)["question"]
        for line in (REPO_ROOT / "data" / "eval" / "rag_questions.jsonl").read_text().splitlines()
        if line.strip()
    ]
    verdicts = guard.check(questions)
    refused = [q for q, v in zip(questions, verdicts, strict=True) if v.blocked]
    old_refused = sum(v.blocked for v in old_guard.check(questions))
    figures["rag_questions_refused"] = len(refused)
    lines += [
        f"**The existing prompt set** (`data/eval/rag_questions.jsonl`, {len(questions)} benign "
        f"questions): refused {len(refused)} (previous guard: {old_refused}). {refused or ''}",
        "",
    ]
    return lines, figures


def document_screen(embedder: Any) -> tuple[list[str], dict[str, Any]]:
    from evaluation.guard import measure_documents
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.corpus.documents import corpus_file, parse_file
    from refinery.ingestion.sync import make_chunker
    from refinery.safety.screening.documents import document_screen as load

    screen = load()
    m = measure_documents(screen, "test")
    corpus = REPO_ROOT / "data" / "corpus"
    docs = [parse_file(corpus_file(p, corpus)) for p in sorted(corpus.iterdir())]
    flagged_docs = [d.source for d in docs if screen.check(d.text) is not None]
    chunker = make_chunker(ChunkingConfig(), embedder)
    chunks = [
        c.text
        for d in docs
        for c in chunker.split(
            doc_id=d.source,
            source=d.source,
            text=d.text,
            format=d.format,
            title=d.title,
            pages=d.meta.get("pages"),
        )
    ]
    flagged_chunks = sum(f is not None for f in screen.flags(chunks))
    lines = [
        f"**Document screen, test split**: {m['injections']} poisoned passages, {m['benign']} "
        f"benign ones ({m['sample_corpus_passages']} of them from the sample-corpus documents "
        "assigned to test).",
        "",
        "| screen | recall | false-positive rate |",
        "|---|---|---|",
        _row("heuristics alone", m["heuristics"]),
        _row("classifier alone", m["classifier"]),
        _row("**both (ingestion and RAG)**", m["both"]),
        "",
        f"Whole sample documents flagged at ingestion: {len(flagged_docs)} of {len(docs)} "
        f"{flagged_docs or ''}. Sample-corpus chunks (default chunking, {len(chunks)} chunks) "
        f"dropped by the RAG screen: {flagged_chunks}.",
        "",
        f"Missed: {json.dumps(m['missed'], ensure_ascii=False)}",
        "",
        f"False positives: {json.dumps(m['false_positives'], ensure_ascii=False)}",
        "",
    ]
    return lines, {
        "documents_test": {k: m[k] for k in ("heuristics", "classifier", "both")},
        "sample_documents_flagged": len(flagged_docs),
        "sample_chunks_flagged": flagged_chunks,
    }


def parser_overhead(rounds: int = 5) -> tuple[list[str], dict[str, Any]]:
    from refinery.corpus.documents import corpus_file, parse_bytes, read_bytes
    from refinery.corpus.isolation import ParserPool

    corpus = REPO_ROOT / "data" / "corpus"
    files = [corpus_file(p, corpus) for p in sorted(corpus.iterdir())]
    data = [(f, read_bytes(f)) for f in files]
    inproc, pooled, started, warm = [], [], [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        for f, b in data:
            parse_bytes(f, b)
        inproc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ParserPool() as pool:
            f, b = data[0]
            pool.parse(f, b)
            started.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            for f, b in data:
                pool.parse(f, b)
            warm.append(time.perf_counter() - t1)
        pooled.append(time.perf_counter() - t0)
    n = len(data)
    old = _old_module("refinery/corpus/documents.py", "refinery_old_documents")
    from refinery.corpus.documents import ParseLimits, _html_text

    depth_rows = []
    for depth in (2000, 4000, 8000):  # the old walk is quadratic: 200,000 would take hours
        page = "<html><body>" + "<div>" * depth + "x" + "</div>" * depth + "</body></html>"
        t0 = time.perf_counter()
        old._html_text(page)
        t_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The depth limit raised so that the walk itself is timed (by default such a page is
        # rejected as too_deep by a linear scan before any walk).
        _html_text(page, ParseLimits(max_depth=depth + 10))
        t_new = time.perf_counter() - t0
        depth_rows.append(f"| {depth} nested <div> | {t_old:.2f} s | {t_new:.3f} s |")
    lines = [
        f"**Parsing the sample corpus** ({n} files; median of {rounds} interleaved rounds):",
        "",
        "| how | time | per file |",
        "|---|---|---|",
        f"| in this process (before: no time budget) | {median(inproc):.2f} s | "
        f"{1000 * median(inproc) / n:.1f} ms |",
        f"| worker pool, started for the run (time budget enforced) | {median(pooled):.2f} s | "
        f"{1000 * median(pooled) / n:.1f} ms |",
        f"| of which: starting the worker (forkserver, imports) + first file | "
        f"{median(started):.2f} s | |",
        f"| of which: the {n} files through a warm worker | {median(warm):.2f} s | "
        f"{1000 * median(warm) / n:.1f} ms |",
        "",
        f"Overhead per file once the worker runs: {1000 * (median(warm) - median(inproc)) / n:+.1f} "
        "ms; fixed cost per run: the worker start. A worker killed at a deadline is replaced by a "
        "fork of the forkserver (no new imports).",
        "",
        "**HTML nesting** (the quadratic walk the issue found, on smaller pages):",
        "",
        "| page | previous `_html_text` | now |",
        "|---|---|---|",
        *depth_rows,
        "",
    ]
    return lines, {"inproc_s": median(inproc), "pool_s": median(pooled), "warm_s": median(warm)}


def main() -> None:
    from refinery.retrieval.embedding import Embedder

    embedder = Embedder()
    started = datetime.now(UTC)
    sections = []
    figures: dict[str, Any] = {}
    for part in (prompt_guard, document_screen):
        lines, figs = part(embedder)
        sections += lines
        figures.update(figs)
    lines, figs = parser_overhead()
    sections += lines
    figures["parsing"] = figs
    text = "\n".join(
        [
            "# Injection screens and parser isolation",
            "",
            f"Run {started:%Y-%m-%d %H:%M} UTC on: {machine()}.",
            "Command: `python -m benchmarks guard`. The guard's and the document screen's "
            "weights and thresholds were chosen on the *tune* splits "
            "(`python -m training.guard`); every figure below is on the *test* splits, "
            "which training and tuning never read, unless it says otherwise.",
            "",
            *sections,
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guard.md").write_text(text + "\n")
    print(text)
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
