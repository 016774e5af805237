"""Object storage for published releases: a local folder and S3."""
