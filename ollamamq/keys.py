# -*- test-case-name: tests.test_keys -*-
"""
API keys: their format, keys minted at runtime (kept in the state file, hashed), and the
C{ollamamq-keys} command that mints one offline for the config file.

A key is C{omq-<prefix>-<secret>}: C{prefix} is 8 random hex digits that name the key
without revealing it (listings, revocation, logs), C{secret} 32 random bytes in URL-safe
base64. Only the SHA-256 digest of the whole key is ever stored; the key itself is shown
once, when it is minted.

Minted keys are rows of the C{api_keys} table in the daemon's SQLite state file
(L{ollamamq.store}): C{prefix}, C{user}, C{digest} (hex), C{created}. At startup
L{loadKeys} reads them before the daemon serves anything; afterwards L{MintedKeys}
writes on the store's thread and tells the L{IdentityResolver}, so a minted key works as
soon as its answer is sent and a revoked one stops before the revocation is answered.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sqlite3
import sys
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ollamamq.identity import IP_PREFIX, MAX_USER_ID, IdentityResolver
from ollamamq.store import Store, StoreError, migrate

KEY_PREFIX = "omq-"


@attrs.frozen
class MintedKey:
    """
    A freshly minted key: the only time the key itself is known.

    @ivar key: the whole key, for the user.
    @ivar prefix: its public name.
    @ivar digest: C{sha256:HEX}, the form the config file and the state file keep.
    """

    key: str = attrs.field(repr=False)
    prefix: str
    digest: str


@attrs.frozen
class KeyInfo:
    """
    What is known of a stored key: never the key.
    """

    user: str
    prefix: str
    created: float


def canHoldKeys(user: str) -> bool:
    """
    Whether C{user} is an id a key can name: not empty, at most L{MAX_USER_ID}
    characters, no control characters, not an address (C{ip:...}): keys name users, not
    hosts.
    """
    return bool(user.strip()) and len(user) <= MAX_USER_ID and not any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in user
    ) and not user.lower().startswith(IP_PREFIX)


def mintKey() -> MintedKey:
    """
    Make a new random key.
    """
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}{prefix}-{secrets.token_urlsafe(32)}"
    return MintedKey(key, prefix, "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest())


def _rows(cursor: Any) -> list[tuple[str, str, str, float]]:
    """
    Every stored key as C{(prefix, user, digest hex, created)}.
    """
    return cursor.execute(
        "SELECT prefix, user, digest, created FROM api_keys ORDER BY created, prefix"
    ).fetchall()


def _insert(cursor: Any, prefix: str, user: str, digest: str, created: float) -> None:
    """
    Store a minted key's digest.
    """
    cursor.execute(
        "INSERT INTO api_keys (prefix, user, digest, created) VALUES (?, ?, ?, ?)",
        (prefix, user, digest, created),
    )


def _delete(cursor: Any, user: str, prefix: str) -> str | None:
    """
    Delete a user's key by prefix; its digest, or L{None} when there is none.
    """
    row = cursor.execute(
        "SELECT digest FROM api_keys WHERE user = ? AND prefix = ?", (user, prefix)
    ).fetchone()
    if row is None:
        return None
    cursor.execute("DELETE FROM api_keys WHERE prefix = ?", (prefix,))
    return row[0]


def loadKeys(path: str, identity: IdentityResolver) -> int:
    """
    At startup, before the reactor runs: read the minted keys of the state file at
    C{path} (creating or migrating it as L{ollamamq.store} does) into C{identity}.

    @return: how many keys were loaded.
    @raise StoreError: when the file cannot be used.
    """
    try:
        connection = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open state file {path}: {e}") from None
    try:
        migrate(connection, path)
        rows = _rows(connection.cursor())
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"state file {path} is not a usable SQLite database ({e}); "
            "move it away to start with no saved state"
        ) from None
    finally:
        connection.close()
    for _, user, digest, _ in rows:
        identity.addKey(user, bytes.fromhex(digest))
    return len(rows)


class UnknownKey(KeyError):
    """
    The user has no key with that prefix.
    """


class MintedKeys:
    """
    Mints, lists and revokes keys at runtime: rows in the store, digests in the resolver.
    """

    def __init__(self, store: Store, identity: IdentityResolver, clock: Any) -> None:
        """
        @param store: the started state store.
        @param identity: told about every minted and revoked key.
        @param clock: supplies C{seconds()} for the C{created} column.
        """
        self._store = store
        self._identity = identity
        self._clock = clock

    async def mint(self, user: str) -> MintedKey:
        """
        Mint a key for C{user}, store its digest, and accept it from then on.
        """
        minted = mintKey()
        digest = minted.digest.partition(":")[2]
        await self._store.runInteraction(
            _insert, minted.prefix, user, digest, self._clock.seconds()
        )
        self._identity.addKey(user, bytes.fromhex(digest))
        return minted

    async def revoke(self, user: str, prefix: str) -> None:
        """
        Revoke C{user}'s key named C{prefix}: refused from now on, and deleted.

        @raise UnknownKey: when C{user} has no such key.
        """
        digest = await self._store.runInteraction(_delete, user, prefix)
        if digest is None:
            raise UnknownKey(prefix)
        self._identity.removeKey(bytes.fromhex(digest))

    def list(self, user: str) -> Deferred[list[KeyInfo]]:
        """
        C{user}'s minted keys, oldest first (prefixes and times, never keys).
        """
        d = self._store.runInteraction(_rows)
        d.addCallback(lambda rows: [
            KeyInfo(owner, prefix, created) for prefix, owner, _, created in rows if owner == user
        ])
        return d


def main(argv: list[str] | None = None, stdin: Any = None, stdout: Any = None) -> int:
    """
    C{ollamamq-keys}: mint a key offline for the config file (C{new}), or print the
    C{sha256:} form of an existing key read from standard input (C{hash}; not an
    argument, so it stays out of shell histories and process lists).
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    parser = argparse.ArgumentParser(
        prog="ollamamq-keys", description="Mint API keys for the ollamamq config file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="mint a new key; print it and its sha256: form")
    new.add_argument("--user", default="NAME", help="the user the TOML snippet names")
    commands.add_parser("hash", help="print the sha256: form of a key read from stdin")
    args = parser.parse_args(argv)
    if args.command == "new":
        minted = mintKey()
        stdout.write(
            f"key:    {minted.key}\n"
            f"digest: {minted.digest}\n"
            "\n"
            "Give the key to the user (it is shown only now) and put its digest in the\n"
            "config file:\n"
            "\n"
            f"[users.{args.user}]\n"
            f'keys = ["{minted.digest}"]\n'
        )
        return 0
    key = stdin.readline().strip()
    if not key or any(c.isspace() for c in key):
        sys.stderr.write("ollamamq-keys hash: expected one key on standard input\n")
        return 2
    stdout.write("sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
