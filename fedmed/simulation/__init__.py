"""A whole federation simulated on this machine."""
