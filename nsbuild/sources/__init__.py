"""Readers of base images (docker-archive, OCI layout/archive) and inspect."""
