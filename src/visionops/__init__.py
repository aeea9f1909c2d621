"""visionops: an end-to-end MLOps system for image classifiers."""

__version__ = "0.1.0"
