"""Which of a ledger's undelivered results are news, where its runs had other settings.

A run reports the results no completed run has delivered (`Ledger.undelivered`). With one set
of settings that is the whole rule. Other settings (new models, another preprocessing version
after an upgrade, `--no-draft`, CUDA one night and the CPU the next) screen a film again, and
leave results under each set: what a reader has seen already must not come back as news, and a
film must not get two rows in one report. So, of the undelivered results:

- one under this run's settings that says what a run under other settings already delivered for
  that path and content, with no other content of the path since (its scores within the sixth
  decimal: `Record.same_result`), is no news. An older one (a killed run's) whose film a run has
  delivered since, and whose path has held another content after that, is stale. Both are
  marked delivered by the run that delivered their film;
- one under other settings waits, undelivered, where this run has a result of its own for the
  same path and content (a run killed before its report, then run again with other settings,
  had reported both).
"""

from __future__ import annotations

from collections.abc import Sequence

from cxrbatch.ledger import Ledger, Stored, readable, rows_for


def news(ledger: Ledger, stored: Sequence[Stored], fp: str) -> list[Stored]:
    """The undelivered results `stored` that a run under settings `fp` reports."""
    return _current(ledger, _settle(ledger, stored, fp), fp)


def _settle(ledger: Ledger, stored: Sequence[Stored], fp: str) -> list[Stored]:
    """`stored` less its entries under these settings that are no news, marked delivered."""
    kept = []
    with ledger.db:
        for s in stored:
            if s.fingerprint != fp or (run := _no_news(ledger, s)) is None:
                kept.append(s)
                continue
            ledger.db.execute(
                "UPDATE entries SET delivered_run = ? WHERE path = ? AND sha256 = ? AND fingerprint = ?",
                (run, s.key, s.sha256, s.fingerprint),
            )
    return kept


def _no_news(ledger: Ledger, s: Stored) -> int | None:
    """The run under other settings that delivered this entry's path and content where that
    makes it no news (see the module's text), or None."""
    if (run := _delivered_alike(ledger, s)) is not None or s.first_run == ledger.run_id:
        return run
    (left,) = ledger.db.execute(
        "SELECT max(o.delivered_run) FROM entries o WHERE o.path = ? AND o.sha256 = ? AND o.fingerprint != ? "
        "AND o.delivered_run > ? AND EXISTS (SELECT 1 FROM entries x WHERE x.path = o.path "
        "AND x.sha256 != o.sha256 AND x.first_run > o.first_run)",
        (s.key, s.sha256, s.fingerprint, s.first_run),
    ).fetchone()
    return None if left is None else int(left)


def _delivered_alike(ledger: Ledger, s: Stored) -> int | None:
    """The run that delivered under other settings, for this path and content, the result `s`
    holds (`s.record`), with no other content since; None where none did."""
    earlier = ledger.db.execute(
        "SELECT o.delivered_run, r.record FROM entries o JOIN results r ON r.sha256 = o.sha256 "
        "AND r.fingerprint = o.fingerprint WHERE o.path = ? AND o.sha256 = ? AND o.fingerprint != ? "
        "AND o.delivered_run > 0 AND NOT EXISTS (SELECT 1 FROM entries x WHERE x.path = o.path "
        "AND x.sha256 != o.sha256 AND x.first_run > o.first_run) ORDER BY o.delivered_run DESC",
        (s.key, s.sha256, s.fingerprint),
    ).fetchall()
    for run, text in earlier:
        before = readable(s.key, text, warn=False)
        if before is not None and s.record.same_result(before):
            return int(run)
    return None


def _current(ledger: Ledger, stored: list[Stored], fp: str) -> list[Stored]:
    """`stored` less its results under other settings for a path and content that has a result
    under these, delivered or not: one row per film, this run's."""
    if all(s.fingerprint == fp for s in stored):
        return stored
    keys = sorted({s.key for s in stored if s.fingerprint != fp})
    ours = set(
        rows_for(ledger.db, "SELECT path, sha256 FROM entries WHERE fingerprint = ? AND path IN ({keys})", keys, fp)
    )
    return [s for s in stored if s.fingerprint == fp or (s.key, s.sha256) not in ours]
