"""Training: the loop and the pieces it delegates to."""
