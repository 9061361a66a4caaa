"""Layer 3, async: the virtual disk over a chain, its block cache and its write-back layer."""
