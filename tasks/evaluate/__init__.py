"""Evaluate step: test-set metrics, pictures, a report and the quality gate; and `predict`.

- `metrics`: the pure core (accuracy, per-class metrics, calibration, confusion matrix);
- `gate`: the quality gate and its error, used by the flow, the CLI and the tests;
- `report`: report.md, the pictures, and the Prefect artifacts;
- `model_io`: loading a stored run's exported model (MXNet) and scoring images;
- `step`: the step (`evaluate`) and `pipeline evaluate` (`evaluate_model`), `read_metrics`;
- `predict`: `pipeline predict`.
Only `model_io`, `step` and `predict` import MXNet.
"""
