"""vhdfs: Microsoft VHD disk images as raw disk files through FUSE."""

__version__ = "0.1.0"
