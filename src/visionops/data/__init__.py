"""Data stages: ingest (sources) -> validate -> prepare, and the shared transforms.

- :mod:`visionops.data.sources`: MNIST IDX, binary CIFAR-10, image folders; checksums
  and explicit downloaders.
- :mod:`visionops.data.ingest`: ``run_ingest`` writes ``data/interim/``.
- :mod:`visionops.data.validate`: ``run_validate`` writes ``reports/validation.json``.
- :mod:`visionops.data.prepare`: ``run_prepare`` writes ``data/prepared/``.
- :mod:`visionops.data.transforms`: the one preprocessing used by training and serving
  (no torch).

Importing this package imports nothing heavy; import the submodule you need.
"""
