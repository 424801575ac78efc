"""Stages: plain functions (config + paths in, typed JSON-serialisable result + files out)."""
