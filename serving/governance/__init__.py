"""Who may search what (keys, roles, policy, rate limits), and the hash-chained audit logs."""
