"""
A simulated Ollama / OpenAI-compatible backend, for demos, tests and benchmarks.
"""
