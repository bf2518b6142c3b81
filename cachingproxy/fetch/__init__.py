"""Fetching from upstream: shared downloads, their followers, spill files, the upstream agent and the parent proxy."""
