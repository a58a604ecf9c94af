"""Integrations with the RL trainers people already use (each imports its trainer: install the extra)."""
