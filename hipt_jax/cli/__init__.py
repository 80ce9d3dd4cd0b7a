"""Command-line entry points that wrap the Python API (see setup.py console_scripts)."""
