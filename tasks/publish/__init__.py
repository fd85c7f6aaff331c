"""Publish step and the artifacts browser.

- `manifest`: the manifest and latest.json documents (pure);
- `step`: the step (`publish`): objects, then the manifest, then latest.json;
- `artifacts`: `pipeline artifacts list|show|pull|verify`;
- `failure`: a failed run's failure.json in the store and its notification (the flow's).
"""
