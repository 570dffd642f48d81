"""Writers: docker/OCI archive framing, OCI layout, stdout."""
