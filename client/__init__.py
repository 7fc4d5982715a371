"""A hospital site (Flower SuperNode + the fedmed client app)."""
