"""
The twistd plugin: C{twistd -n ollamamq}. A pointer only; the wiring is in L{ollamamq.tap}.
"""

from twisted.application.service import ServiceMaker

ollamamq = ServiceMaker(
    "ollamamq",
    "ollamamq.tap",
    "Fair-share queueing proxy for Ollama and OpenAI-compatible LLM servers.",
    "ollamamq",
)
