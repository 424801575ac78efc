"""Data layer: task bundles (format, validation, hashing, loading, S3) and the synthetic suite."""
