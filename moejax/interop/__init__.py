"""Checkpoint interop with other ecosystems: Hugging Face (``moejax.interop.hf``)."""
