"""ragserve: a RAG serving controller."""
__version__ = "0.1.0"
