"""The DBOS workflow of a thread run, its steps, and how runs are submitted and stopped."""
