"""A fleet of nodes sharing one cache on S3-compatible object storage (SPEC 12)."""
