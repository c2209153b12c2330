"""Edge machine learning: a built-in anomaly detector and ONNX models with a lifecycle.

- :mod:`edgeway.ml.zscore`: the ``anomaly`` pipeline step, a rolling z-score
  per device and metric that needs no trained model (predictive maintenance
  from the first day).
- :mod:`edgeway.ml.store`: the model registry on disk (versions, SHA-256,
  Ed25519 signatures).
- :mod:`edgeway.ml.manager`: loaded models, the inference thread, shadow and
  canary candidates, budgets and automatic rollback.
- :mod:`edgeway.ml.step`: the ``model`` pipeline step that feeds readings to a
  model and emits its outputs as metrics rules can use.

See docs/models.md.
"""
