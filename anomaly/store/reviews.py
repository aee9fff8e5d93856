"""Reviews: recording a verdict (which becomes the result's current one), review progress and who reviewed.

A saved review updates only its result's copy of the latest verdict and its run's counts, so the pages
that list verdicts never rank a run's reviews to find the current one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from anomaly.store.dialect import NotFoundError
from anomaly.store.schema import VERDICTS, Result, Review, Run, utcnow

MAX_REVIEWERS = 500
"""Reviewer names offered by a filter (each costs one index probe)."""


def add_review(s: Session, result_id: int, reviewer: str, verdict: str, note: str = "") -> Review:
    """Record a reviewer's verdict on a result; it becomes the result's current verdict."""
    if verdict not in VERDICTS:
        raise ValueError(
            f"unknown verdict {verdict!r} for result {result_id}; use one of: {', '.join(VERDICTS)}"
        )
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ValueError(f"review of result {result_id} needs a reviewer name")
    result = s.get(Result, result_id)
    if result is None:
        raise NotFoundError(f"cannot review result {result_id}: it does not exist in this database")
    review = Review(
        result_id=result_id, reviewer=reviewer, verdict=verdict, note=note or "", created_at=utcnow()
    )
    s.add(review)
    s.flush()
    newly_reviewed = result.verdict is None and result.status == "ok"
    result.verdict, result.reviewer, result.reviewed_at, result.review_id = (
        verdict, reviewer, review.created_at, review.id)
    counts = {"n_reviews": Run.n_reviews + 1, "version": Run.version + 1}
    if newly_reviewed:
        counts["n_reviewed"] = Run.n_reviewed + 1
    s.execute(update(Run).where(Run.id == result.run_id).values(counts)
              .execution_options(synchronize_session=False))
    s.flush()
    return review


def review_progress(s: Session, run_id: int) -> tuple[int, int]:
    """(reviewed, total) over the run's successfully scored results, from the run's kept counts."""
    row = s.execute(select(Run.n_reviewed, Run.n_scored).where(Run.id == run_id)).one_or_none()
    return (0, 0) if row is None else (int(row.n_reviewed), int(row.n_scored))


def reviewers(s: Session, run_id: int) -> list[str]:
    """Names of the current reviewers of the run's results, sorted (one index probe per name)."""
    stmt = text(
        "WITH RECURSIVE names(name, depth) AS ("
        " SELECT min(reviewer), 1 FROM results WHERE run_id = :run AND reviewer IS NOT NULL"
        " UNION ALL"
        " SELECT (SELECT min(reviewer) FROM results WHERE run_id = :run AND reviewer > names.name), depth + 1"
        " FROM names WHERE names.name IS NOT NULL AND depth < :most"
        ") SELECT name FROM names WHERE name IS NOT NULL"
    )
    return [name for (name,) in s.execute(stmt, {"run": run_id, "most": MAX_REVIEWERS})]


@dataclass(frozen=True)
class ReviewedScores:
    """Scores and current verdicts of a run's reviewed results, and how many scored results are unreviewed."""

    scores: list[float]
    verdicts: list[str]
    n_unreviewed: int


def reviewed_scores(s: Session, run_id: int) -> ReviewedScores:
    """Score and verdict of each reviewed, scored result of the run (read through the verdict index)."""
    stmt = select(Result.score, Result.verdict).where(
        Result.run_id == run_id, Result.verdict.is_not(None), Result.status == "ok", Result.score.is_not(None))
    scores, verdicts = [], []
    for score, verdict in s.execute(stmt):
        scores.append(float(score or 0.0))  # scores are not null here (the query requires them)
        verdicts.append(str(verdict))
    done, total = review_progress(s, run_id)
    return ReviewedScores(scores, verdicts, max(total - done, 0))
