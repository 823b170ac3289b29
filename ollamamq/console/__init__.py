"""
The operator console: an urwid application that attaches to a running ollamamq daemon over
its AMP control socket, shows backends, users, the queue and recent events, and sends the
operator's actions back as control commands.
"""
