"""Model pieces: adapters."""
