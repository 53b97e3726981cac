"""Web UI: generated from the settings schema (core/settings.py); holds no training logic."""
