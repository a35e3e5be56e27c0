"""The built-in reply sources: `mock.py` (the default) and `openai.py` (see app/sources.py)."""
