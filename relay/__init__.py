"""relay: a self-hosted webhook relay gateway."""

__version__ = "0.1.0"
