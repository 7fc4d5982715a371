"""PKI for the federation, encryption at rest, and integrity of checkpoints."""
