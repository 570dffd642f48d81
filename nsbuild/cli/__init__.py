"""The typer commands and doctor."""
