"""Layer 0: VHD structures as bytes and as typed records. Nothing here does I/O."""
