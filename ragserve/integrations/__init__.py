"""Adapters for other frameworks. `ragserve.integrations.langchain` needs langchain-core."""
