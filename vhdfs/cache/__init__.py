"""Layer 2: bounded memory for metadata and data (and, for writes, dirty data)."""
