"""mathctl: one command-line toolkit for the math post-training lifecycle."""

__version__ = "0.1.0"
