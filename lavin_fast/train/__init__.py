"""lavin_fast.train."""
