"""archup: a parallel archival uploader for S3-compatible storage."""

__version__ = "0.1.0"
