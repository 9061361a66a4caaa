"""Process lifecycle: option parsing, daemonizing, and the trio main loop."""
