"""
The live status page (C{GET /proxy/ui}): one static HTML file with plain JavaScript,
shipped as package data; see L{ollamamq.web.page}.
"""
