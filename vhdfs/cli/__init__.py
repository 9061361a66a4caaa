"""Command-line entry points: ``vhdfs`` (mount) and ``vhd`` (image tools)."""
