"""The FUSE boundary: request handlers.

pyfuse3 is imported only here, by the daemon's loop and by the mount command, which creates
the session.
"""
