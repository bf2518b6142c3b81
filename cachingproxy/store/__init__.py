"""Cache stores: where responses and their bodies are kept."""

from .disk import CacheDirError, DiskStore
from .memory import MemoryStore

__all__ = ["CacheDirError", "DiskStore", "MemoryStore"]
