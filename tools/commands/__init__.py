"""One module per `streamspec` sub-command (see tools/cli.py)."""
