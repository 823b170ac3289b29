"""
ollamamq: a fair-share queueing proxy for Ollama and OpenAI-compatible LLM servers.
"""

__version__ = "0.1.0"
