"""launcher: run a command with a union as its root."""
