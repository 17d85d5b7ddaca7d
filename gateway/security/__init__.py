"""Security: signed command envelopes, roles, trusted time, tamper-evident audit log."""
