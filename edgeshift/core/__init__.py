"""The bottom layer: errors, atomic writes, one registry, one strict config loader, tables, CLI plumbing.

It imports nothing else of edgeshift, and nothing heavier than typer: every other package builds on it, the
device side included.
"""
