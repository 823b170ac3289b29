"""
The control plane: the operator actions on a running daemon and their two front ends.

  - L{ollamamq.control.actions}: the one implementation of every operator action
    (snapshot, listings, user policy, address blocks, backends, cancelling queued
    requests, reload) and the event stream.
  - L{ollamamq.control.amp}: the AMP commands, shared by the daemon and the console.
  - L{ollamamq.control.server}: the AMP responders and the UNIX-socket service.
  - L{ollamamq.control.http}: the admin HTTP routes (C{/proxy/...}) as their own Klein app.
"""
