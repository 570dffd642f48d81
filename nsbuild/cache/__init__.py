"""The local layer cache and the shared cache record."""
