"""The chaos harness (``orderonce chaos``): publish a realistic stream with hostile input, inject
the faults of ../shared/FAULTS.md while real workers run it, heal, drain, and check from the
database and an independent publish log that every event took effect exactly once."""
