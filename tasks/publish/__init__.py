"""Publish step and the artifacts browser.

- `manifest`: the manifest and latest.json documents (pure);
- `step`: the step (`publish`): objects, then the manifest, then latest.json;
- `artifacts`: `pipeline artifacts list|show|pull|verify`.
"""
