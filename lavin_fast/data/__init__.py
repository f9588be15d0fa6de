"""lavin_fast.data."""
