"""Mirrors: mounted upstreams, presets, and the rewriting of index documents."""
