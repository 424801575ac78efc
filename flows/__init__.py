"""Prefect flows: `continual_task` (one bundle through every stage) and `watch_inbox` (the trigger)."""
