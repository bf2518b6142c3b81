"""Cache stores: where responses and their bodies are kept."""

from .disk import DiskStore
from .index import CacheDirError, Index
from .memory import MemoryStore

__all__ = ["CacheDirError", "DiskStore", "Index", "MemoryStore"]
