"""The layer tar format both ways: owners, the deterministic writer, header-only scanning of untrusted tars."""
