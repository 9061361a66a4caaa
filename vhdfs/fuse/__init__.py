"""The FUSE boundary: the only package that imports pyfuse3 (besides the daemon)."""
