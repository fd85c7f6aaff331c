"""The base floor: what every step and the orchestration import; it imports nothing above it.

- `config`: `PipelineConfig`, the one configuration (defaults < PIPELINE_* < flags);
- `errors`: `PipelineError`, the one root of the errors a user can cause;
- `layout`: every file name of a run directory, a store, the work dir and the dataset cache;
- `uris`: the one `file://` URI -> path (`local_path`) and path -> URI (`to_uri`);
- `files`: the one atomic write (`atomic_file`), the one file SHA-256, reads that never follow
  a link and stop at a bound;
- `locks`: the one-holder `flock` (two runs of one run id never share its run directory);
- `logs`: the one step logger; `text`: escaping untrusted strings before a terminal sees them;
- `store`: the artifact stores (file://, s3://), their documents and verified downloads.
"""
