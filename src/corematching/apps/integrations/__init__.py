"""Bridges to other tools (optional extras): lmms-eval."""
