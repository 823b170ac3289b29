# -*- test-case-name: tests.test_usagecli -*-
"""
C{ollamamq-usage}: the totals of C{GET /proxy/usage}, as a table or CSV.

It asks a running daemon (C{--url}, with the admin key from C{--admin-key} or
C{OLLAMAMQ_ADMIN_KEY}), or reads a state file directly (C{--state}, read-only, also while
the daemon runs: SQLite's WAL lets readers in).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, TextIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from twisted.python import usage

from ollamamq.requestlog import GROUPS, connectReadOnly, usageTotals

COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "unknown", "cancelled", "errors",
           "bytes", "duration", "queue_wait")


class Options(usage.Options):
    """
    C{ollamamq-usage} options.
    """

    synopsis = "[options]"
    longdesc = "Usage totals from the ollamamq request log, per user, model, backend or day."
    optFlags = [["csv", None, "Print CSV instead of a table."]]
    optParameters = [
        ["url", "u", "http://127.0.0.1:11435", "The daemon's base URL."],
        ["admin-key", "k", None, "The admin key [default: $OLLAMAMQ_ADMIN_KEY]."],
        ["state", "s", None, "Read this state file directly instead of asking the daemon."],
        ["since", None, None, "From this time (Unix seconds or ISO 8601, UTC)."],
        ["until", None, None, "Before this time (Unix seconds or ISO 8601, UTC)."],
        ["user", None, None, "Only this user."],
        ["model", None, None, "Only this model."],
        ["group", "g", "user", f"Group by {' | '.join(GROUPS)}."],
    ]

    def postOptions(self) -> None:
        """
        Check the group.
        """
        if self["group"] not in GROUPS:
            raise usage.UsageError(f"--group: expected one of {', '.join(GROUPS)}")


def fetchTotals(options: Options, environ: dict[str, str]) -> list[dict[str, Any]]:
    """
    The totals, from the daemon or the state file.

    @raise SystemExit: with a message, when they cannot be had.
    """
    filters = {k: options[k] for k in ("since", "until", "user", "model", "group")
               if options[k] is not None}
    if options["state"]:
        from ollamamq.api import usageFilters

        try:
            checked = usageFilters({k.encode(): [v.encode()] for k, v in filters.items()})
        except Exception as e:
            raise SystemExit(f"ollamamq-usage: {getattr(e, 'message', e)}") from None
        try:
            db = connectReadOnly(options["state"])
            try:
                return usageTotals(db.cursor(), **checked)
            finally:
                db.close()
        except Exception as e:
            raise SystemExit(f"ollamamq-usage: cannot read {options['state']}: {e}") from None
    url = options["url"].rstrip("/") + "/proxy/usage?" + urlencode(filters)
    key = options["admin-key"] or environ.get("OLLAMAMQ_ADMIN_KEY")
    request = Request(url, headers={"X-Admin-Key": key} if key else {})
    try:
        with urlopen(request, timeout=60) as response:
            return json.loads(response.read())["totals"]
    except HTTPError as e:
        try:
            error = json.loads(e.read()).get("error")
            message = error.get("message") if isinstance(error, dict) else error
        except ValueError:
            message = e.reason
        raise SystemExit(f"ollamamq-usage: {e.code}: {message}") from None
    except (URLError, OSError) as e:
        raise SystemExit(f"ollamamq-usage: cannot reach {options['url']}: "
                         f"{getattr(e, 'reason', e)}") from None


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in ("duration", "queue_wait"):
        return f"{value:.1f}"
    return str(value)


def printTotals(rows: list[dict[str, Any]], group: str, asCSV: bool, out: TextIO) -> None:
    """
    Write the totals as an aligned table (numbers right-aligned, a total line) or CSV.
    """
    header = [group, *COLUMNS]
    if asCSV:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[group], *(row[c] for c in COLUMNS)])
        return
    table = [header] + [[_cell(group, row[group])] + [_cell(c, row[c]) for c in COLUMNS]
                        for row in rows]
    if rows:
        table.append(["total"] + [_cell(c, sum(r[c] or 0 for r in rows)) for c in COLUMNS])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        if index == len(table) - 1 and rows:
            out.write("  ".join("-" * w for w in widths) + "\n")
        cells = [line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        out.write("  ".join(cells).rstrip() + "\n")
    if not rows:
        out.write("(no requests)\n")


def main(argv: list[str] | None = None, out: TextIO | None = None,
         environ: dict[str, str] | None = None) -> None:
    """
    The console script.
    """
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit(f"ollamamq-usage: {e}\n{options}") from None
    rows = fetchTotals(options, dict(os.environ) if environ is None else environ)
    buffer = io.StringIO()
    printTotals(rows, options["group"], options["csv"], buffer)
    (out or sys.stdout).write(buffer.getvalue())


if __name__ == "__main__":
    main()
