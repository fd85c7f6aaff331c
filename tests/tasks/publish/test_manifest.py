"""tasks/publish/manifest.py: what latest.json may name, and how a run is listed (pure)."""

from __future__ import annotations

import json

from pipeline.base.store.documents import Manifest, parse_document
from tasks.publish.manifest import (
    damaged_summary,
    format_run_line,
    latest_record,
    parse_restarts,
    promotion_refusal,
    run_summary,
    utc_iso,
)
from tests.support.documents import manifest_bytes

SHA = "cd" * 32


def manifest(run_id: str, published_after: int = 0, passed: bool = True) -> Manifest:
    data = json.loads(manifest_bytes(run_id, {}, published_after=published_after))
    data["metrics"]["gate"]["passed"] = passed
    return parse_document(Manifest, json.dumps(data).encode(), "manifest.json")


def test_times_are_fixed_width_utc_so_string_order_is_time_order() -> None:
    assert utc_iso(0) == "1970-01-01T00:00:00.000000+00:00"
    assert utc_iso(9.5) < utc_iso(10) < utc_iso(100)


def test_restart_lines_that_are_not_json_objects_are_left_out() -> None:
    text = '{"restart": 1, "rank": 1}\nnot json\n[1, 2]\n\n{"restart": 2}\n'
    assert parse_restarts(text) == [{"restart": 1, "rank": 1}, {"restart": 2}]


def test_latest_names_the_runs_manifest_and_its_promotion() -> None:
    latest = latest_record(manifest("r2", published_after=3), SHA, 4, "2026-01-02T00:00:00")
    assert (latest.run_id, latest.manifest, latest.manifest_sha256) == (
        "r2",
        "runs/r2/manifest.json",
        SHA,
    )
    assert (latest.sequence, latest.published_after, latest.order()) == (4, 3, (3, "r2"))


def test_only_a_passing_run_published_later_replaces_latest() -> None:
    current = latest_record(manifest("r2", published_after=3), SHA, 4, "now")
    assert promotion_refusal(manifest("r1"), None) is None
    assert promotion_refusal(manifest("r3", published_after=4), current) is None
    assert promotion_refusal(manifest("r2", published_after=3), current) is None  # itself again
    assert "did not pass the quality gate" in promotion_refusal(
        manifest("r3", published_after=9, passed=False), current
    )
    assert promotion_refusal(manifest("r1", published_after=2), current) == (
        "latest.json names run r2, published after run r1 "
        "(publication order (3, 'r2') >= (2, 'r1'))"
    )


def test_a_run_is_one_escaped_line_and_a_damaged_one_says_why() -> None:
    run = run_summary(manifest("r1"), latest_run_id="r1")
    assert (run["run_id"], run["latest"], run["gate_passed"]) == ("r1", True, True)
    run["run_id"] = "r\x1b[2J1"  # a summary's strings come from a store: escaped when shown
    line = format_run_line(run)
    assert line.startswith("r\\x1b[2J1  accuracy 0.9000  gate passed  created 2026-01-01 00:00:00")
    assert line.endswith("<- latest") and "\x1b" not in line
    assert format_run_line(run_summary(manifest("r2"), latest_run_id="r1")).endswith("UTC")
    damaged = format_run_line(damaged_summary("r3", "not a valid Manifest: \x00"))
    assert damaged == "r3  DAMAGED: not a valid Manifest: \\x00"
