"""The one escape for text that came from outside (a store, a run directory, a data file)
before it reaches a terminal or a log line.

A manifest key or a date string is anyone-with-write-access's text: `ESC [2J` clears the
reader's screen, `ESC ] 0;...BEL` retitles the terminal, a newline forges a log line, a NUL
or a bidi override hides what follows. Such characters are shown as Python escapes instead.
"""

from __future__ import annotations

import logging
import unicodedata

# Control (Cc), format (Cf: bidi overrides, zero-width), line/paragraph separators, surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every control or format character escaped (`\\x1b`, `\\x00`, `\\u202e`).

    keep_newlines: leave '\\n' as it is (for a message the pipeline itself wrapped over lines;
    text from outside is escaped with it off, so it can never start a line of its own).
    """
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(
        char
        if (keep_newlines and char == "\n")
        or char == " "
        or unicodedata.category(char) not in _UNSAFE_CATEGORIES
        else _escaped(char)
        for char in text
    )


class PrintableFilter(logging.Filter):
    """A logging filter that escapes each record's formatted message (its own newlines kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message, keep_newlines=True)
        if safe != message:
            record.msg, record.args = safe, None
        return True


PRINTABLE_FILTER = PrintableFilter()


def escape_logger(logger: logging.Logger) -> logging.Logger:
    """`logger` with PRINTABLE_FILTER attached (once)."""
    if PRINTABLE_FILTER not in logger.filters:
        logger.addFilter(PRINTABLE_FILTER)
    return logger
