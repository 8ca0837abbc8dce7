"""secure_agg."""
