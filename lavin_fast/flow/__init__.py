"""lavin_fast.flow."""
