"""The device-facing engine: step functions (no I/O), the one inference path, the trainer."""
