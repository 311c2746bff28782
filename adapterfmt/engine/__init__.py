"""Merge/unmerge engine and base-checkpoint access."""
