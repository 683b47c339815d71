"""`hpcembed serve`: live queries against the same model and engine as `hpcembed run` (serve/server.py)."""
