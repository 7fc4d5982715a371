"""The central side (Flower SuperLink + the fedmed server app)."""
