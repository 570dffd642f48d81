"""Leaf helpers with no nsbuild imports but errors: compressors and hashing writers, progress, image references."""
