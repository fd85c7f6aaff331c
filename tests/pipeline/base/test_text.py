"""pipeline/base/text.py: text from outside is escaped before a terminal or a log sees it."""

from __future__ import annotations

import logging

import pytest

from pipeline.base.text import PRINTABLE_FILTER, escape_logger, printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain key/with spaces.png", "plain key/with spaces.png"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("title\x1b]0;owned\x07", "title\\x1b]0;owned\\x07"),
        ("nul\x00byte", "nul\\x00byte"),
        ("forged\nline", "forged\\x0aline"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("ünïcödé 字", "ünïcödé 字"),
    ],
)
def test_control_and_format_characters_are_shown_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_newlines_the_pipeline_wrote_itself_may_stay() -> None:
    assert printable("first\nsecond\x1b", keep_newlines=True) == "first\nsecond\\x1b"


def test_an_escaped_logger_escapes_each_message_once_however_often_asked() -> None:
    logger = logging.getLogger("tests.text.escaped")
    assert escape_logger(escape_logger(logger)) is logger
    assert logger.filters.count(PRINTABLE_FILTER) == 1
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("object %s", "evil\x1b[2J")
        logger.warning("plain %d", 3)
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["object evil\\x1b[2J", "plain 3"]
