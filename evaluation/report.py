"""The Evidently report of an evaluation: per-example scores of the challenger, side by side
with the champion's when there is one. A self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evaluation.automatic import ModelEvaluation

SCORE_COLUMNS = [
    "exact_match",
    "token_f1",
    "rouge_l",
    "hit_at_k",
    "reciprocal_rank",
    "groundedness",
    "confidence",
]


def examples_frame(evaluation: ModelEvaluation) -> pd.DataFrame:
    rows = []
    for ex in evaluation.examples:
        rows.append(
            {
                "model": evaluation.label,
                "kind": ex.kind,
                "example_id": ex.example_id,
                "question": ex.question,
                "answer": ex.answer,
                "reference": ex.reference,
                "answer_words": len(ex.answer.split()),
                "latency_s": ex.latency_s,
                **{c: ex.scores.get(c) for c in SCORE_COLUMNS},
            }
        )
    return pd.DataFrame(rows)


def write_report(challenger: ModelEvaluation, champion: ModelEvaluation | None, path: Path) -> Path:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataSummaryPreset

    numeric = ["answer_words", "latency_s", *SCORE_COLUMNS]
    definition = DataDefinition(
        numerical_columns=numeric, categorical_columns=["kind"], text_columns=["answer"]
    )

    def dataset(evaluation: ModelEvaluation) -> Dataset:
        frame = examples_frame(evaluation)[["kind", "answer", *numeric]]
        return Dataset.from_pandas(frame, data_definition=definition)

    report = Report(
        [DataSummaryPreset()],
        metadata={
            "challenger": challenger.label,
            "champion": champion.label if champion else "none",
        },
    )
    snapshot = report.run(
        current_data=dataset(challenger), reference_data=dataset(champion) if champion else None
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    return path
