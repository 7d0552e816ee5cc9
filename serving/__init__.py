"""Search service over sharded binary indexes (no torch dependency)."""
