"""lavin_fast.eval."""
