"""Releases with known truth, generated here: planted (structure designed in) and trained (structure learned from
text)."""
