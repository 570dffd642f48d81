"""Orchestration, the only package importing every stage: layered and single-layer builds, remote images."""
