# -*- test-case-name: tests.test_console_widgets -*-
"""
The console's screen, built from plain data: a status snapshot (the shape of
C{/proxy/status}, DESIGN.md section 4, with the control plane's additions), pushed event
dicts and the throughput the controller measured.

Nothing here talks to the daemon. Keys that ask for an operator action become an
L{Action} handed to the C{onAction} callback; the controller (L{ollamamq.console.app})
turns it into a control command and reports the answer back with
L{ConsoleView.showStatus}.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import attrs
import urwid

PANELS = ("backends", "users", "queue", "blocked")
TITLES = {"backends": "Backends", "users": "Users", "queue": "Queue", "blocked": "Blocked"}

# How many pushed events the strip keeps (older ones are dropped: bounded memory).
EVENT_HISTORY = 50

# Samples in the header's throughput history (one a second); as many as fit are drawn.
HISTORY = 120

PALETTE = [
    ("header", "white,bold", "dark blue"),
    ("header dim", "light gray", "dark blue"),
    ("spark", "light cyan", "dark blue"),
    ("panel", "black", "light gray"),
    ("panel active", "white,bold", "dark cyan"),
    ("focus", "black", "light cyan"),
    ("selected", "default,underline", "default"),
    ("dim", "dark gray", "default"),
    ("legend", "light gray", "default"),
    ("vip", "light magenta,bold", "default"),
    ("boost", "yellow,bold", "default"),
    ("running", "light cyan", "default"),
    ("waiting", "light green", "default"),
    ("idle", "dark gray", "default"),
    ("blocked", "light red,bold", "default"),
    ("online", "light green", "default"),
    ("suspect", "yellow", "default"),
    ("offline", "light red", "default"),
    ("draining", "light blue", "default"),
    ("event", "light gray", "default"),
    ("event time", "dark gray", "default"),
    ("status", "white", "dark gray"),
    ("status error", "white,bold", "dark red"),
    ("disconnected", "white,bold", "dark red"),
    ("prompt", "black,bold", "yellow"),
    ("help", "black", "light gray"),
]

# Marker glyphs, UTF-8 and plain ASCII (for terminals without UTF-8). Each is one column.
_UTF8_MARKS = {
    "vip": "◆", "boost": "▲", "running": "▶", "waiting": "●", "idle": "○",
    "blocked": "✖", "online": "●", "suspect": "◐", "offline": "○", "unknown": "?",
    "draining": "◌", "collapsed": "▸", "expanded": "▾",
}
_ASCII_MARKS = {
    "vip": "V", "boost": "B", "running": ">", "waiting": "*", "idle": ".",
    "blocked": "X", "online": "+", "suspect": "?", "offline": "-", "unknown": "?",
    "draining": "~", "collapsed": "+", "expanded": "-",
}
_UTF8_SPARKS = " ▁▂▃▄▅▆▇█"
_ASCII_SPARKS = " .:-=+*#%"

HELP = """\
Keys
  j/k, up/down   move the selection in the panel
  Tab, h/l       switch panel (Shift-Tab backwards)
  Space, Enter   expand/collapse a backend's model list
  p              toggle VIP for the selected user
  b              toggle boost for the selected user
  + / -          raise / lower the selected user's weight
  x              block the selected user
  X              block the selected user's IP address
  u              unblock the selected user or IP
  d              drain / undrain the selected backend
  c              cancel the selected queued request (asks y/n)
  /              filter users by name (Enter keeps, Esc clears)
  r              reload the daemon's config
  ?              this help (any key closes it)
  q, Esc         quit the console (the daemon keeps running)

In the Queue panel, p/b/+/-/x/X act on the request's user.
"""


def utf8Terminal() -> bool:
    """
    Whether urwid encodes for a UTF-8 terminal (from the locale), so the glyph markers
    can be drawn.
    """
    return urwid.util.get_encoding_mode() == "utf8"


def formatDuration(seconds: float | None) -> str:
    """
    A short human duration: C{"7s"}, C{"3m05s"}, C{"2h07m"}, C{"3d04h"}; C{"-"} for none.
    """
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def formatRate(value: float) -> str:
    """
    A rate with sensible precision: C{"0"}, C{"0.4"}, C{"12.5"}, C{"1234"}.
    """
    if value <= 0:
        return "0"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def formatNumber(value: float) -> str:
    """
    A compact count: C{"950"}, C{"12.3k"}, C{"4.5M"}.
    """
    if value < 1000:
        return f"{value:g}" if isinstance(value, float) else str(value)
    if value < 1_000_000:
        return f"{value / 1000:.1f}k"
    return f"{value / 1_000_000:.1f}M"


def sparkline(values: Sequence[float], width: int, utf8: bool = True) -> str:
    """
    The last C{width} values drawn as a one-line bar chart scaled to the largest shown.
    """
    glyphs = _UTF8_SPARKS if utf8 else _ASCII_SPARKS
    shown = list(values)[-width:] if width > 0 else []
    top = max(shown, default=0)
    bars = []
    for value in shown:
        if top <= 0 or value <= 0:
            bars.append(glyphs[0])
        else:
            # Anything above zero gets at least the lowest bar, so a trickle is visible.
            bars.append(glyphs[max(1, round(value / top * (len(glyphs) - 1)))])
    return "".join(bars).rjust(width, glyphs[0])


def backendState(backend: dict) -> str:
    """
    The state shown for a backend: C{draining} wins over the probed state, which is
    C{online}, C{suspect}, C{offline} or C{unknown}.
    """
    if backend.get("draining"):
        return "draining"
    state = backend.get("state")
    if state in ("online", "suspect", "offline", "unknown"):
        return state
    return "online" if backend.get("online") else "offline"


def userMarks(user: dict) -> list[str]:
    """
    The marker names for a user, most important first: blocked, VIP or boost, and
    running, waiting or idle.
    """
    marks = []
    if user.get("blocked"):
        marks.append("blocked")
    if user.get("priority") in ("vip", "boost"):
        marks.append(user["priority"])
    if user.get("active"):
        marks.append("running")
    elif user.get("queued"):
        marks.append("waiting")
    else:
        marks.append("idle")
    return marks


def userIP(user: dict) -> str | None:
    """
    The IP address known for a user: its C{ip} field, or the address in an C{ip:ADDRESS}
    identity.
    """
    if user.get("ip"):
        return str(user["ip"])
    ident = str(user.get("id", ""))
    if ident.startswith("ip:"):
        return ident[3:]
    return None


def describeEvent(event: dict) -> str:
    """
    One line for a pushed event (the names of L{ollamamq.control.amp}); an event this
    console does not know reads as its name and fields.
    """
    kind = str(event.get("type", "event"))
    user, model = event.get("user"), event.get("model")
    if kind == "request.queued":
        return f"{user} queued {model} ({event.get('queued')} waiting)"
    if kind == "request.started":
        return f"{user} started {model} on {event.get('backend')} after {formatDuration(event.get('waited'))}"
    if kind == "request.finished":
        return f"{user} finished {model} on {event.get('backend')} in {formatDuration(event.get('duration'))}"
    if kind == "request.cancelled":
        return f"{user}'s {model} request cancelled ({event.get('reason')})"
    if kind == "backend.changed":
        if event.get("removed"):
            return f"backend {event.get('name')} removed"
        text = f"backend {event.get('name')} {backendState(event)}"
        return text + (f": {event['error']}" if event.get("error") and backendState(event) != "online" else "")
    if kind == "policy.changed" and isinstance(event.get("user"), dict):
        u = event["user"]
        text = f"{u.get('id')}: {u.get('priority')}, weight {formatNumber(u.get('weight', 1))}"
        return text + (", blocked" if u.get("blocked") else "")
    if kind == "policy.changed" and "address" in event:
        return f"address {event['address']} " + ("blocked" if event.get("blocked") else "unblocked")
    if kind == "config.reloaded":
        changes = event.get("changes") or []
        return "config reloaded: " + ("; ".join(map(str, changes)) if changes else "no changes")
    if kind == "events.dropped":
        return f"{event.get('count')} events missed; resynchronising"
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k != "type")
    return f"{kind} {fields}".strip()


@attrs.frozen
class Action:
    """
    An operator action asked for with a key, for the controller to send to the daemon.

    @ivar name: C{priority}, C{weight}, C{block}, C{blockIP}, C{unblock}, C{unblockIP},
        C{drain}, C{undrain}, C{cancel}, C{reload} or C{quit}.
    @ivar args: the action's target and values, e.g. C{{"user": "alice", "priority": "vip"}}.
    @ivar label: what the status line says while it runs, e.g. C{"alice: VIP"}.
    """

    name: str
    args: dict = attrs.field(factory=dict)
    label: str = ""


@attrs.frozen
class Row:
    """
    One line (or a few, when expanded) of a panel.

    @ivar key: what stays selected across updates (a backend name, a user id, ...).
    @ivar markup: urwid text markup, or a function returning it (called only when the row
        is drawn).
    @ivar data: the entry it shows, for the actions on it.
    """

    key: Any
    markup: Any
    data: Any = None


def _mark(marks: dict[str, str], name: str) -> tuple[str, str]:
    """
    A marker's markup: its attribute and glyph.
    """
    return (name, marks[name])


def backendRows(backends: Iterable[dict], expanded: set[str], utf8: bool = True) -> list[Row]:
    """
    Backends panel rows: marker, name, URL, state, kind, active/slots and the loaded
    models; an expanded backend lists all its models below.
    """
    marks = _UTF8_MARKS if utf8 else _ASCII_MARKS
    rows = []
    for b in backends:
        name = str(b.get("name", "?"))
        state = backendState(b)
        loaded = ", ".join(b.get("loaded") or []) or "-"
        toggle = marks["expanded"] if name in expanded else marks["collapsed"]
        slots = f"{b.get('active', 0)}/{b.get('slots', '?')}"
        markup: list[Any] = [
            _mark(marks, state), " ",
            f"{name:<10.10} ",
            (state, f"{state:<8}"),
            f" {str(b.get('kind') or '-'):<6.6} {slots:<5} {str(b.get('url', '')):<22.22} ",
            toggle, f" {loaded}",
        ]
        if name in expanded:
            models = b.get("models") or []
            listed = "\n".join(
                f"    {'*' if m in (b.get('loaded') or []) else ' '} {m}" for m in models
            )
            markup.append("\n" + (listed or "    (no models)"))
        rows.append(Row(name, markup, b))
    return rows


def _userMarkup(u: dict, marks: dict[str, str], extraWait: float) -> list[Any]:
    """
    The markup of one Users row (see L{userRows}).
    """
    ident = str(u.get("id", "?"))
    shown = userMarks(u)
    glyphs: list[Any] = [_mark(marks, m) for m in shown]
    pad = " " * (4 - len(shown))
    tokens = u.get("tokens")
    if isinstance(tokens, dict):
        tokens = sum(v for v in tokens.values() if isinstance(v, (int, float)))
    tokenText = formatNumber(tokens) if isinstance(tokens, (int, float)) else "-"
    weight = u.get("weight", 1)
    priority = str(u.get("priority", "normal"))
    oldest = u.get("oldest_wait")
    wait = formatDuration(oldest + extraWait) if u.get("queued") and isinstance(
        oldest, (int, float)) else "-"
    markup = [
        *glyphs, pad,
        f"{ident:<15.15} ",
        (priority if priority in ("vip", "boost") else "idle", f"{priority:<6}"),
        f" w{formatNumber(weight):<4} q{u.get('queued', 0):<4} run{u.get('active', 0):<3}"
        f" served {formatNumber(u.get('served', 0)):<6} tok {tokenText:<6} wait {wait}",
    ]
    if u.get("blocked"):
        markup.append(("blocked", " BLOCKED"))
    return markup


def userRows(users: Iterable[dict], utf8: bool = True, extraWait: float = 0.0) -> list[Row]:
    """
    Users panel rows: markers, id, priority and weight, queued, running, served, tokens
    and the wait of the user's oldest queued request (plus C{extraWait}, the seconds
    since the snapshot). The text is built only for the rows drawn.
    """
    marks = _UTF8_MARKS if utf8 else _ASCII_MARKS
    return [Row(str(u.get("id", "?")), partial(_userMarkup, u, marks, extraWait), u) for u in users]


def queueRows(queue: Iterable[dict], extraWait: float = 0.0) -> list[Row]:
    """
    Queue panel rows in dispatch order: position, user, model, how long it has waited.

    @param extraWait: seconds since the snapshot was taken, added to each wait so the
        column keeps counting between snapshots.
    """
    rows = []
    for index, q in enumerate(queue):
        position = q.get("position", index + 1)
        waited = q.get("waited")
        waitedText = formatDuration(waited + extraWait) if isinstance(waited, (int, float)) else "-"
        markup = (
            f"{position:>3} {str(q.get('user', '?')):<16.16} {str(q.get('model', '?')):<16.16}"
            f" {waitedText}"
        )
        rows.append(Row(q.get("id", index), markup, q))
    return rows


def blockedRows(users: Iterable[dict], ips: Iterable[str], utf8: bool = True) -> list[Row]:
    """
    Blocked panel rows: blocked users, then blocked IP addresses and networks.
    """
    marks = _UTF8_MARKS if utf8 else _ASCII_MARKS
    rows = [
        Row(("user", str(u.get("id"))), [_mark(marks, "blocked"), f" user {u.get('id')}"], u)
        for u in users
        if u.get("blocked")
    ]
    rows += [Row(("ip", str(ip)), [_mark(marks, "blocked"), f" ip   {ip}"], ip) for ip in ips]
    return rows


def legend(utf8: bool = True) -> list[Any]:
    """
    The markers' legend, as text markup.
    """
    marks = _UTF8_MARKS if utf8 else _ASCII_MARKS
    markup: list[Any] = []
    for name, label in (
        ("vip", "vip "), ("boost", "boost "), ("running", "running "), ("waiting", "queued "),
        ("idle", "idle "), ("blocked", "blocked"), (None, " "), ("online", "online "),
        ("suspect", "suspect "), ("offline", "offline "), ("draining", "draining"),
    ):
        if name is not None:
            markup.append(_mark(marks, name))
        markup.append(("legend", label))
    return markup


def headerMarkup(snapshot: dict, requestRate: float, tokenRate: float | None,
                 uptime: float | None, uptimeLabel: str = "up") -> list[Any]:
    """
    The header's text: daemon version and uptime (or, when the daemon does not say, how
    long this console has been attached), request and token rates (C{-} while the daemon
    reports no token counts), queued and running totals.
    """
    version = snapshot.get("version") or "?"
    tokens = "-" if tokenRate is None else formatRate(tokenRate)
    return [
        ("header", f" ollamamq {version} "),
        ("header dim", f"{uptimeLabel} {formatDuration(uptime)} "),
        ("header", f"{formatRate(requestRate)} req/s {tokens} tok/s "),
        ("header dim", f"queued {snapshot.get('queued', 0)} running {snapshot.get('active', 0)} "),
    ]


class Sparkline(urwid.Widget):
    """
    A one-row bar chart of the newest values that fit the width it is given, so a wider
    terminal shows a longer history.
    """

    _sizing = frozenset([urwid.Sizing.FLOW])

    def __init__(self, utf8: bool = True) -> None:
        super().__init__()
        self.values: list[float] = []
        self.utf8 = utf8

    def setValues(self, values: Sequence[float]) -> None:
        """
        Draw C{values} (oldest first) from now on.
        """
        self.values = list(values)
        self._invalidate()

    def rows(self, size: tuple[int], focus: bool = False) -> int:
        """
        Always one row.
        """
        return 1

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        """
        The newest C{size[0]} values as bars.
        """
        (cols,) = size
        return urwid.Text(("spark", sparkline(self.values, cols, self.utf8)), wrap="clip").render(size)


class _RowWalker(urwid.ListWalker):
    """
    The rows of a L{Panel}, turned into widgets only when the ListBox asks for them (the
    visible ones), so a panel of thousands of users costs a screenful of widgets per
    redraw, not thousands.
    """

    def __init__(self, panel: Panel) -> None:
        self.panel = panel
        self.focus = 0
        self._widgets: dict[int, urwid.Widget] = {}

    def reset(self, focus: int) -> None:
        """
        Forget the built widgets (the rows changed) and focus C{focus}.
        """
        self._widgets.clear()
        self.focus = focus
        self._modified()

    def __len__(self) -> int:
        """
        The number of rows (at least one: the "(none)" line).
        """
        return max(1, len(self.panel.entries))

    def __getitem__(self, position: int) -> urwid.Widget:
        """
        The widget of row C{position}, built on first use.
        """
        if not 0 <= position < len(self):
            raise IndexError(position)
        widget = self._widgets.get(position)
        if widget is None:
            widget = self._widgets[position] = self.panel._widgetAt(position)
        return widget

    def next_position(self, position: int) -> int:
        """
        The row after C{position}; L{IndexError} at the end.
        """
        if position + 1 >= len(self):
            raise IndexError(position)
        return position + 1

    def prev_position(self, position: int) -> int:
        """
        The row before C{position}; L{IndexError} at the start.
        """
        if position <= 0:
            raise IndexError(position)
        return position - 1

    def set_focus(self, position: int) -> None:
        """
        Focus row C{position} (the ListBox scrolls to keep it in view).
        """
        self.focus = position
        self._modified()


class Panel(urwid.WidgetWrap):
    """
    A titled list whose selection is kept by row key across updates. The view moves the
    selection itself (L{move}), so keys never leak into the surrounding containers.
    """

    def __init__(self, name: str, heading: str = "") -> None:
        self.name = name
        self.heading = heading
        self.entries: list[Row] = []
        self.selected: Any = None
        self.active = False
        self.total: int | None = None
        self._title = urwid.Text("", wrap="clip")
        self._titleMap = urwid.AttrMap(self._title, "panel")
        self._walker = _RowWalker(self)
        self._list = urwid.ListBox(self._walker)
        super().__init__(urwid.Frame(self._list, header=self._titleMap))
        self._refresh()

    def setRows(self, rows: list[Row]) -> None:
        """
        Show C{rows}, keeping the selected key when it is still there, else the same
        position (clamped).
        """
        oldIndex = self._index()
        self.entries = rows
        if self._index() is None:
            index = min(oldIndex or 0, len(rows) - 1)
            self.selected = rows[index].key if rows else None
        self._refresh()

    def setActive(self, active: bool) -> None:
        """
        Mark this panel as the one the keys act on.
        """
        self.active = active
        self._refresh()

    def move(self, delta: int) -> None:
        """
        Move the selection C{delta} rows (clamped at both ends).
        """
        if not self.entries:
            return
        index = self._index() or 0
        self.selected = self.entries[max(0, min(len(self.entries) - 1, index + delta))].key
        self._refresh()

    def selectedRow(self) -> Row | None:
        """
        The selected row, if the panel has any.
        """
        index = self._index()
        return None if index is None else self.entries[index]

    def _index(self) -> int | None:
        """
        The selected row's index, or L{None}.
        """
        for index, row in enumerate(self.entries):
            if row.key == self.selected:
                return index
        return None

    def _widgetAt(self, position: int) -> urwid.Widget:
        """
        Build the widget of row C{position}.
        """
        if not self.entries:
            return urwid.Text(("dim", "  (none)"))
        row = self.entries[position]
        text = urwid.Text(row.markup() if callable(row.markup) else row.markup, wrap="clip")
        if row.key != self.selected:
            return text
        # Only the selected row needs an AttrMap (they are costly to build).
        return urwid.AttrMap(text, "focus" if self.active else "selected")

    def _refresh(self) -> None:
        """
        Update the title and let the list rebuild its visible rows.
        """
        count = f"{len(self.entries)}" if self.total in (None, len(self.entries)) else (
            f"{len(self.entries)} of {self.total}")
        self._title.set_text(f" {TITLES.get(self.name, self.name)} ({count})  {self.heading}")
        self._titleMap.set_attr_map({None: "panel active" if self.active else "panel"})
        self._walker.reset(self._index() or 0)


class ConsoleView(urwid.WidgetWrap):
    """
    The whole screen: header with throughput history, legend (or the disconnection
    banner), the four panels, the event strip and the status line.

    @ivar onAction: called with each L{Action} the operator asks for.
    """

    def __init__(self, onAction: Callable[[Action], None], utf8: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.onAction = onAction
        self.utf8 = utf8Terminal() if utf8 is None else utf8
        self._clock = clock
        self.snapshot: dict = {}
        self._snapshotAt = 0.0
        self.expanded: set[str] = set()
        self.filter = ""
        self.events: deque[tuple[float, dict]] = deque(maxlen=EVENT_HISTORY)
        self.panels = {
            "backends": Panel("backends", "name, state, kind, active/slots, url, loaded models"),
            "users": Panel("users"),
            "queue": Panel("queue", "in dispatch order: user, model, waited"),
            "blocked": Panel("blocked", "users and IPs"),
        }
        self.current = "users"
        self._header = urwid.Text("", wrap="clip")
        self._spark = Sparkline(self.utf8)
        self._legend = urwid.Text(legend(self.utf8), wrap="clip")
        self._legendMap = urwid.AttrMap(self._legend, None)
        self._eventText = urwid.Text("", wrap="clip")
        self._status = urwid.Text("", wrap="clip")
        self._statusMap = urwid.AttrMap(self._status, "status")
        self._prompt: urwid.Widget | None = None
        self._confirm: Action | None = None
        self._filterEdit: urwid.Edit | None = None
        self._overlay: urwid.Widget | None = None
        self.connection: str | None = "connecting"
        self._rates: tuple[float, float | None, list[float]] = (0.0, None, [])
        self._uptime: float | None = None
        self._uptimeLabel = "up"
        header = urwid.AttrMap(
            urwid.Columns([("pack", self._header), self._spark]), "header"
        )
        self._body = urwid.Pile([
            ("weight", 3, self.panels["backends"]),
            ("weight", 5, self.panels["users"]),
            ("weight", 4, urwid.Columns([("weight", 3, self.panels["queue"]),
                                          ("weight", 2, self.panels["blocked"])], dividechars=1)),
        ])
        self._events = urwid.Pile([
            urwid.AttrMap(urwid.Text(" Events", wrap="clip"), "panel"),
            urwid.BoxAdapter(urwid.Filler(self._eventText, valign="bottom"), 3),
        ])
        self._footer = urwid.Pile([self._events, self._statusMap])
        self._frame = urwid.Frame(
            self._body, header=urwid.Pile([header, self._legendMap]), footer=self._footer
        )
        super().__init__(self._frame)
        self.panels[self.current].setActive(True)
        self.showConnection("connecting")
        self.showStatus("Press ? for help.")
        self._renderEvents()

    # --- what the controller tells the view ---

    def showSnapshot(self, snapshot: dict) -> None:
        """
        Show a status snapshot: backends, users (filtered), queue, blocked.
        """
        self.snapshot = snapshot
        self._snapshotAt = self._clock()
        self._fill()

    def showRates(self, requestRate: float, tokenRate: float | None, history: Sequence[float]) -> None:
        """
        Show the measured request and token rates and the throughput history.
        """
        self._rates = (requestRate, tokenRate, list(history))
        self._renderHeader()

    def tick(self) -> None:
        """
        Advance what counts on its own between snapshots: uptime and queue waits.
        """
        self._fill()

    def showEvent(self, event: dict, when: float | None = None) -> None:
        """
        Add a pushed event to the strip (the oldest is dropped past L{EVENT_HISTORY}).
        """
        self.events.append((self._clock() if when is None else when, event))
        self._renderEvents()

    def showStatus(self, text: str, error: bool = False) -> None:
        """
        Put an action's result (or error) in the status line.
        """
        self._statusMap.set_attr_map({None: "status error" if error else "status"})
        self._status.set_text(f" {text}")
        if self._prompt is None:
            self._footer.contents[-1] = (self._statusMap, self._footer.options())

    def showConnection(self, problem: str | None) -> None:
        """
        C{None} once attached to the daemon; otherwise what is wrong, shown in a banner
        instead of the legend until the connection is back.
        """
        self.connection = problem
        if problem is None:
            self._legend.set_wrap_mode("clip")
            self._legend.set_text(legend(self.utf8))
            self._legendMap.set_attr_map({None: None})
        else:
            # The whole explanation matters (what to do about it): wrap, never clip.
            self._legend.set_wrap_mode("space")
            self._legend.set_text(f" {problem}")
            self._legendMap.set_attr_map({None: "disconnected"})

    # --- rendering ---

    def _fill(self) -> None:
        """
        Rebuild every panel and the header from the snapshot and the filter.
        """
        snap = self.snapshot
        users = [u for u in snap.get("users") or [] if self._matches(u.get("id"))]
        queue = [q for q in snap.get("queue") or [] if self._matches(q.get("user"))]
        extra = max(0.0, self._clock() - self._snapshotAt) if snap else 0.0
        self.panels["users"].heading = (
            f"[filter: {self.filter}]" if self.filter else "w weight, q queued, run running"
        )
        # Listings longer than the console reads say how many there are in all.
        for panel, field in (("queue", "queue_total"), ("users", "users_total")):
            total = snap.get(field)
            self.panels[panel].total = total if isinstance(total, int) and not self.filter else None
        self.panels["backends"].setRows(backendRows(snap.get("backends") or [], self.expanded, self.utf8))
        self.panels["users"].setRows(userRows(users, self.utf8, extra))
        self.panels["queue"].setRows(queueRows(queue, extra))
        self.panels["blocked"].setRows(blockedRows(snap.get("users") or [], snap.get("blocked_ips") or [],
                                                   self.utf8))

        self._uptime, self._uptimeLabel = None, "up"
        for field, label in (("uptime", "up"), ("attached", "attached")):
            if isinstance(snap.get(field), (int, float)):
                self._uptime, self._uptimeLabel = snap[field] + extra, label
                break
        self._renderHeader()

    def _matches(self, ident: Any) -> bool:
        """
        Whether an id passes the filter.
        """
        return not self.filter or self.filter.lower() in str(ident).lower()

    def _renderHeader(self) -> None:
        """
        Redraw the header's text and history from the last rates.
        """
        requestRate, tokenRate, history = self._rates
        self._header.set_text(headerMarkup(self.snapshot, requestRate, tokenRate, self._uptime,
                                           self._uptimeLabel))
        self._spark.setValues(history[-HISTORY:])

    def _renderEvents(self) -> None:
        """
        Show the newest three events in the strip.
        """
        lines: list[Any] = []
        for when, event in list(self.events)[-3:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            if lines:
                lines.append("\n")
            lines += [("event time", f" {stamp} "), ("event", describeEvent(event))]
        self._eventText.set_text(lines or [("dim", " (no events yet)")])

    # --- keys ---

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        """
        Handle a key: overlays and prompts first, then navigation, then actions.
        """
        if self._overlay is not None:
            self._closeOverlay()
            return None
        if self._confirm is not None:
            action, self._confirm = self._confirm, None
            self._closePrompt()
            if key in ("y", "Y"):
                self._act(action)
            else:
                self.showStatus("Not cancelled.")
            return None
        if self._filterEdit is not None:
            return self._filterKey(size, key)
        return self._commandKey(key)

    def _commandKey(self, key: str) -> str | None:
        """
        Navigation and action keys; an unknown key is returned.
        """
        panel = self.panels[self.current]
        if key in ("j", "down"):
            panel.move(1)
        elif key in ("k", "up"):
            panel.move(-1)
        elif key == "page down":
            panel.move(10)
        elif key == "page up":
            panel.move(-10)
        elif key in ("tab", "l", "right"):
            self.switchPanel(1)
        elif key in ("shift tab", "h", "left"):
            self.switchPanel(-1)
        elif key in (" ", "enter"):
            self._toggleExpand()
        elif key == "?":
            self._openHelp()
        elif key in ("q", "esc"):
            self._act(Action("quit"))
        elif key == "/":
            self._openFilter()
        elif key == "r":
            self._act(Action("reload", {}, "reload config"))
        elif key in ("p", "b", "+", "-", "x", "X", "u", "d", "c"):
            self._actionKey(key)
        else:
            return key
        return None

    def switchPanel(self, delta: int) -> None:
        """
        Make the next (C{delta=1}) or previous panel the one the keys act on.
        """
        self.panels[self.current].setActive(False)
        self.current = PANELS[(PANELS.index(self.current) + delta) % len(PANELS)]
        self.panels[self.current].setActive(True)

    def _selectedUser(self) -> dict | None:
        """
        The user the selection stands for: in Users the row, in Queue the
        request's user, in Blocked a blocked user; else L{None}.
        """
        row = self.panels[self.current].selectedRow()
        if row is None:
            return None
        if self.current == "users":
            return row.data
        if self.current in ("queue", "blocked"):
            ident = row.data.get("user") if self.current == "queue" else (
                row.key[1] if row.key[0] == "user" else None)
            for user in self.snapshot.get("users") or []:
                if user.get("id") == ident:
                    return user
            return {"id": ident} if ident is not None else None
        return None

    def _actionKey(self, key: str) -> None:
        """
        The keys that act on the selection: d, c, u and the user keys.
        """
        if key == "d":
            row = self.panels["backends"].selectedRow() if self.current == "backends" else None
            if row is None:
                self.showStatus("d: select a backend in the Backends panel first.", error=True)
                return
            name = row.key
            if row.data.get("draining"):
                self._act(Action("undrain", {"backend": name}, f"undrain {name}"))
            else:
                self._act(Action("drain", {"backend": name}, f"drain {name}"))
            return
        if key == "c":
            row = self.panels["queue"].selectedRow() if self.current == "queue" else None
            if row is None:
                self.showStatus("c: select a queued request in the Queue panel first.", error=True)
                return
            q = row.data
            action = Action("cancel", {"request": row.key},
                            f"cancel request {row.key} of {q.get('user')}")
            self._confirm = action
            self._openPrompt(urwid.Text(
                ("prompt", f" Cancel request {row.key} of {q.get('user')} ({q.get('model')})? y/n "),
                wrap="clip"))
            return
        if key == "u":
            self._unblock()
            return
        user = self._selectedUser()
        if user is None:
            self.showStatus(f"{key}: select a user in the Users or Queue panel first.", error=True)
            return
        ident = user["id"]
        priority = user.get("priority", "normal")
        if key == "p":
            new = "normal" if priority == "vip" else "vip"
            self._act(Action("priority", {"user": ident, "priority": new}, f"{ident}: priority {new}"))
        elif key == "b":
            new = "normal" if priority == "boost" else "boost"
            self._act(Action("priority", {"user": ident, "priority": new}, f"{ident}: priority {new}"))
        elif key in ("+", "-"):
            weight = float(user.get("weight", 1) or 1)
            if key == "+":
                new = weight + 1 if weight >= 1 else weight * 2
            else:
                new = weight - 1 if weight >= 2 else weight / 2
            self._act(Action("weight", {"user": ident, "weight": new},
                             f"{ident}: weight {formatNumber(new)}"))
        elif key == "x":
            self._act(Action("block", {"user": ident}, f"block user {ident}"))
        elif key == "X":
            ip = userIP(user)
            if ip is None:
                self.showStatus(f"X: no IP address is known for {ident}.", error=True)
                return
            self._act(Action("blockIP", {"ip": ip}, f"block IP {ip}"))

    def _unblock(self) -> None:
        """
        u: unblock the selected Blocked entry, or the selected user.
        """
        if self.current == "blocked":
            row = self.panels["blocked"].selectedRow()
            if row is None:
                self.showStatus("u: nothing is blocked.", error=True)
                return
            kind, value = row.key
            if kind == "ip":
                self._act(Action("unblockIP", {"ip": value}, f"unblock IP {value}"))
            else:
                self._act(Action("unblock", {"user": value}, f"unblock user {value}"))
            return
        user = self._selectedUser()
        if user is None:
            self.showStatus("u: select a user or a Blocked entry first.", error=True)
            return
        self._act(Action("unblock", {"user": user["id"]}, f"unblock user {user['id']}"))

    def _toggleExpand(self) -> None:
        """
        Space/Enter on a backend: show or hide its model list.
        """
        if self.current != "backends":
            return
        row = self.panels["backends"].selectedRow()
        if row is None:
            return
        self.expanded ^= {row.key}
        self._fill()

    def _act(self, action: Action) -> None:
        """
        Show that an action is on its way, and hand it to the controller.
        """
        if action.label:
            self.showStatus(f"{action.label}...")
        self.onAction(action)

    # --- prompts and overlays ---

    def _openPrompt(self, widget: urwid.Widget) -> None:
        """
        Put C{widget} where the status line is, with the keys going to the view.
        """
        self._prompt = widget
        self._footer.contents[-1] = (widget, self._footer.options())
        self._footer.focus_position = len(self._footer.contents) - 1
        self._frame.focus_position = "footer"

    def _closePrompt(self) -> None:
        """
        Put the status line back.
        """
        self._prompt = None
        self._footer.contents[-1] = (self._statusMap, self._footer.options())
        self._frame.focus_position = "body"

    def _openFilter(self) -> None:
        """
        /: edit the filter in the prompt line.
        """
        self._filterEdit = urwid.Edit(("prompt", " filter users: "), self.filter)
        self._openPrompt(self._filterEdit)

    def _filterKey(self, size: tuple[int, ...], key: str) -> str | None:
        """
        A key while the filter is edited: Enter keeps it, Esc clears it, others edit.
        """
        edit = self._filterEdit
        assert edit is not None
        if key == "esc":
            self._filterEdit = None
            self.filter = ""
            self._closePrompt()
            self.showStatus("Filter cleared.")
        elif key == "enter":
            self._filterEdit = None
            self._closePrompt()
            self.showStatus(f"Filter: {self.filter}" if self.filter else "Filter cleared.")
        else:
            edit.keypress((max(1, size[0]),), key)
            self.filter = edit.edit_text
        self._fill()
        return None

    def _openHelp(self) -> None:
        """
        ?: the key reference over the screen.
        """
        box = urwid.LineBox(urwid.AttrMap(urwid.Filler(urwid.Text(HELP), valign="top"), "help"),
                            title="ollamamq console help")
        self._overlay = urwid.Overlay(box, self._frame, "center", 66, "middle", HELP.count("\n") + 3)
        self._w = self._overlay

    def _closeOverlay(self) -> None:
        """
        Close the help.
        """
        self._overlay = None
        self._w = self._frame
