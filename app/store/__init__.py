"""PostgreSQL tables threadgate owns: threads, runs and messages."""
