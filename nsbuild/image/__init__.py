"""The Image value: config, manifests, index, media types."""
