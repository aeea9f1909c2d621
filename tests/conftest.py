"""Suite-wide settings, applied before any test module imports torch or mlflow."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# torch's OpenMP threads busy-wait by default, which starves concurrent processes
# (servers, dvc stages) on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
