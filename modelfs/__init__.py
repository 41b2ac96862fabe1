"""modelfs: large models as content-defined, deduplicated chunks in S3, readable as a filesystem."""

__version__ = "0.1.0"
