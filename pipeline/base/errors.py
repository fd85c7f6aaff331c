"""The root of every error a user can cause or fix (bad input, unreachable mirror, gate miss).

The CLI prints such an error as one `error: ...` line with no traceback; anything else is a bug
and keeps its traceback.
"""


class PipelineError(Exception):
    """An error whose message is the whole story for the user."""


class PermanentError(PipelineError):
    """A failure that retrying cannot fix (a full disk, a read-only cache): Prefect's task
    retries and the download loops give up at once."""
