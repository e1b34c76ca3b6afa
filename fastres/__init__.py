"""fastres."""
