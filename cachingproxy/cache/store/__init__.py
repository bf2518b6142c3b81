"""Cache stores: where responses and their bodies are kept."""

from cachingproxy.cache.store.disk import DiskStore
from cachingproxy.cache.store.index import CacheDirError, Index
from cachingproxy.cache.store.memory import MemoryStore

__all__ = ["CacheDirError", "DiskStore", "Index", "MemoryStore"]
