"""Runtimes that drive strategies and trainers: ``sim`` (in-process, default)."""
