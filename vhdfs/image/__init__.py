"""Layer 1: image files and chains. Synchronous, no trio, no FUSE."""
