"""Small helpers every layer may use: atomic files, device choice."""
