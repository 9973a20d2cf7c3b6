"""How cxrbatch's log lines look, in the command line and in its decoding processes alike.

A module of its own, importing nothing of cxrbatch, so that a decoding process can be given the
run's format (`cxrbatch.decoding`) without importing the command line.
"""

from __future__ import annotations

import logging

# The machine's local time with its offset from UTC: the hour a clock goes back repeats, and
# the offset tells its two halves apart (02:30:00 +0200, then 02:30:00 +0100).
TIME_FORMAT = "%Y-%m-%d %H:%M:%S %z"


class LineFormatter(logging.Formatter):
    """`2026-12-02 02:00:03 +0100 [error] message`: a timestamp on every line, the level as a grep-able word."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().translate(_CONTROLS)
        line = f"{self.formatTime(record, TIME_FORMAT)} [{record.levelname.lower()}] {message}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )
        return _escaped(line)


# A message is one line: a file name's newline or carriage return (which wrote a fake `[error]` or
# summary line into the cron log) and terminal escapes are shown as `\n`, `\r`, `\x1b`, `\u009b`;
# so are the line and paragraph separators, where Python's str.splitlines() also ends a line.
_CONTROLS = {c: f"\\x{c:02x}" for c in range(0x20) if c != 0x09} | {0x0A: "\\n", 0x0D: "\\r", 0x7F: "\\x7f"}
_CONTROLS |= {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)}


def _escaped(text: str) -> str:
    """A file name's undecodable bytes as the reports write them (`\\xff`), not as Python's
    surrogates (`\\udcff`, which is what stderr showed), so a name from a report is found in the log."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte made: leave the line as it is
        return text
