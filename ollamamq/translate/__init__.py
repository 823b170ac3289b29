"""
Protocol translation between the API families the proxy speaks: Ollama C{/api/*}, OpenAI
C{/v1/*} and Anthropic C{/v1/messages}, for requests whose model only a backend of the
other dialect serves. One module per pair of dialects; L{ollamamq.translate.plan} picks
the translation for a request and a granted backend.
"""
