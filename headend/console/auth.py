"""Who may use the console and what each may do: users, roles, sessions, logins.

Roles (a user has exactly one):

=================  ==========================================================
role               may
=================  ==========================================================
viewer             see every page
billing_clerk      see, and sell top-ups
field_supervisor   see, and operate relays (trip, close)
administrator      all of the above, and see the users and their sessions
=================  ==========================================================

Like the gateway's signing roles, selling credit and cutting supply are
separate: a billing clerk cannot operate a relay, a field supervisor cannot
sell credit. Users are added by an administrator on the headend host
(``edgegw headend user add``); the console has no sign-up.

Passwords are hashed with scrypt (:func:`hash_password`, N = 2^15, r = 8,
p = 1, a 16-byte salt, the parameters kept in the hash so they can be raised
later). A session is a random 256-bit token in an HttpOnly, SameSite=Strict
cookie; the database keeps only its SHA-256, with the session's CSRF token,
its owner and when it was made and last seen. A session ends at logout, after
:data:`IDLE_MS` without a request, :data:`ABSOLUTE_MS` after login, when its
user is disabled or removed, and when the user's password changes.

Failed logins are counted per user name and per client address in the
database (so headends sharing one database share the count); past
:data:`MAX_FAILURES_PER_USER` or :data:`MAX_FAILURES_PER_ADDRESS` within
:data:`FAILURE_WINDOW_MS` a login is refused before its password is checked.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from firmware_bridge.errors import EdgeGwError, ErrorKind
from firmware_bridge.identifiers import is_user_name
from headend.console.db import ConsoleDb


class Role(enum.StrEnum):
    VIEWER = "viewer"
    BILLING_CLERK = "billing_clerk"
    FIELD_SUPERVISOR = "field_supervisor"
    ADMINISTRATOR = "administrator"


class Permission(enum.StrEnum):
    VIEW = "view"
    TOPUP = "topup"
    RELAY = "relay"
    USERS = "users"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.BILLING_CLERK: frozenset({Permission.VIEW, Permission.TOPUP}),
    Role.FIELD_SUPERVISOR: frozenset({Permission.VIEW, Permission.RELAY}),
    Role.ADMINISTRATOR: frozenset(Permission),
}

IDLE_MS = 30 * 60_000  # a session unused this long ends
ABSOLUTE_MS = 12 * 3_600_000  # and every session ends this long after login
SEEN_EVERY_MS = 60_000  # how often a session's last-seen time is written
FAILURE_WINDOW_MS = 15 * 60_000
MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
MIN_PASSWORD_LENGTH = 10


_SCRYPT_N_LOG2, _SCRYPT_R, _SCRYPT_P = 15, 8, 1
_MAXMEM = 64 * 1024 * 1024


class UserError(EdgeGwError):
    """A user cannot be added or changed as asked (the message says why)."""

    kind = ErrorKind.INVALID


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(password: str, salt: bytes, n_log2: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=1 << n_log2, r=r, p=p, maxmem=_MAXMEM, dklen=32
    )


def hash_password(password: str) -> str:
    """``scrypt$N_LOG2$R$P$SALT$HASH`` (salt and hash in base64)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N_LOG2, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N_LOG2}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a malformed hash matches nothing)."""
    try:
        scheme, n_log2, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not 10 <= int(n_log2) <= 20:
            return False
        got = _scrypt(password, base64.b64decode(salt), int(n_log2), int(r), int(p))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


_dummy: list[str] = []


def _dummy_hash() -> str:
    """Checked when the user name is unknown, so that an unknown name costs as long
    as a wrong password (the response time does not tell which names exist)."""
    if not _dummy:
        _dummy.append(hash_password(secrets.token_urlsafe(16)))
    return _dummy[0]


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password != password.strip():
        raise UserError("the password must not start or end with white space")


def check_username(name: str) -> None:
    if not is_user_name(name):
        raise UserError(
            f"user name {name!r}: 1-64 characters a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise UserError(f"role {text!r}: one of {', '.join(r.value for r in Role)}") from None


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    created_ms: int
    changed_ms: int
    disabled: bool

    @property
    def permissions(self) -> frozenset[Permission]:
        return ROLE_PERMISSIONS[self.role]

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    created_ms: int
    seen_ms: int


_USER_COLS = "username, role, created_ms, changed_ms, disabled"


def _user(row: tuple[object, ...]) -> User:
    return User(str(row[0]), Role(str(row[1])), int(str(row[2])), int(str(row[3])), bool(row[4]))


class Users:
    """The console's users, sessions and failed logins, in the headend database."""

    def __init__(self, db: ConsoleDb) -> None:
        self.db = db

    # -- users ---------------------------------------------------------------------

    async def add(self, username: str, role: Role, password: str, now_ms: int) -> User:
        check_username(username)
        check_new_password(password)
        if await self.get(username) is not None:
            raise UserError(f"user {username!r} exists already (edgegw headend user passwd changes its password)")
        await self.db.execute(
            "INSERT INTO console_users (username, role, password_hash, created_ms, changed_ms, disabled)"
            " VALUES (?, ?, ?, ?, ?, 0)",
            (username, role.value, hash_password(password), now_ms, now_ms),
        )
        user = await self.get(username)
        assert user is not None
        return user

    async def get(self, username: str) -> User | None:
        row = await self.db.fetchone(f"SELECT {_USER_COLS} FROM console_users WHERE username = ?", (username,))
        return None if row is None else _user(row)

    async def all(self) -> list[User]:
        rows = await self.db.fetchall(f"SELECT {_USER_COLS} FROM console_users ORDER BY username")
        return [_user(r) for r in rows]

    async def set_password(self, username: str, password: str, now_ms: int) -> None:
        """A new password; every session of the user ends."""
        check_new_password(password)
        n = await self.db.execute(
            "UPDATE console_users SET password_hash = ?, changed_ms = ? WHERE username = ?",
            (hash_password(password), now_ms, username),
        )
        if not n:
            raise UserError(f"no user {username!r}")
        await self.end_sessions(username)

    async def set_role(self, username: str, role: Role, now_ms: int) -> None:
        n = await self.db.execute(
            "UPDATE console_users SET role = ?, changed_ms = ? WHERE username = ?", (role.value, now_ms, username)
        )
        if not n:
            raise UserError(f"no user {username!r}")
        await self.end_sessions(username)

    async def set_disabled(self, username: str, disabled: bool, now_ms: int) -> None:
        n = await self.db.execute(
            "UPDATE console_users SET disabled = ?, changed_ms = ? WHERE username = ?",
            (1 if disabled else 0, now_ms, username),
        )
        if not n:
            raise UserError(f"no user {username!r}")
        await self.end_sessions(username)

    # -- logins --------------------------------------------------------------------

    async def login_blocked(self, username: str, remote: str, now_ms: int) -> bool:
        """Whether too many logins failed lately for this name or from this address."""
        since = now_ms - FAILURE_WINDOW_MS
        for key, limit in ((f"user:{username}", MAX_FAILURES_PER_USER), (f"ip:{remote}", MAX_FAILURES_PER_ADDRESS)):
            row = await self.db.fetchone(
                "SELECT count(*) FROM console_login_failures WHERE key = ? AND time_ms > ?", (key, since)
            )
            if row is not None and int(row[0]) >= limit:
                return True
        return False

    async def authenticate(self, username: str, password: str, remote: str, now_ms: int) -> User | None:
        """The user if the password is right and the user enabled; a failure is counted."""
        row = await self.db.fetchone(
            f"SELECT {_USER_COLS}, password_hash FROM console_users WHERE username = ?", (username,)
        )
        stored = str(row[5]) if row is not None else _dummy_hash()
        ok = verify_password(password, stored) and row is not None and not bool(row[4])
        if ok and row is not None:
            return _user(row)
        await self.db.execute(
            "DELETE FROM console_login_failures WHERE time_ms <= ?", (now_ms - FAILURE_WINDOW_MS,)
        )
        for key in (f"user:{username}", f"ip:{remote}"):
            await self.db.execute(
                "INSERT INTO console_login_failures (key, time_ms) VALUES (?, ?)", (key, now_ms)
            )
        return None

    # -- sessions ------------------------------------------------------------------

    @staticmethod
    def _id_hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    async def start_session(self, user: User, remote: str, now_ms: int) -> tuple[str, Session]:
        """A new session: the cookie's token, and the session."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        await self.db.execute(
            "INSERT INTO console_sessions (id_hash, username, csrf, created_ms, seen_ms, remote)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self._id_hash(token), user.username, csrf, now_ms, now_ms, remote),
        )
        return token, Session(user, csrf, now_ms, now_ms)

    async def session(self, token: str, now_ms: int) -> Session | None:
        """The live session of this cookie value; an expired one is deleted."""
        if not token or len(token) > 128:
            return None
        id_hash = self._id_hash(token)
        row = await self.db.fetchone(
            f"SELECT s.csrf, s.created_ms, s.seen_ms, {', '.join('u.' + c for c in _USER_COLS.split(', '))}"
            " FROM console_sessions s JOIN console_users u ON u.username = s.username WHERE s.id_hash = ?",
            (id_hash,),
        )
        if row is None:
            return None
        csrf, created, seen = str(row[0]), int(row[1]), int(row[2])
        user = _user(row[3:])
        if user.disabled or now_ms - seen > IDLE_MS or now_ms - created > ABSOLUTE_MS or user.changed_ms > created:
            await self.db.execute("DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,))
            return None
        if now_ms - seen >= SEEN_EVERY_MS:
            await self.db.execute("UPDATE console_sessions SET seen_ms = ? WHERE id_hash = ?", (now_ms, id_hash))
            seen = now_ms
        return Session(user, csrf, created, seen)

    async def end_session(self, token: str) -> None:
        await self.db.execute("DELETE FROM console_sessions WHERE id_hash = ?", (self._id_hash(token),))

    async def end_sessions(self, username: str) -> None:
        await self.db.execute("DELETE FROM console_sessions WHERE username = ?", (username,))

    async def sessions(self, now_ms: int) -> list[tuple[str, int, int, str]]:
        """Live sessions: (user, created, last seen, client address)."""
        await self.db.execute(
            "DELETE FROM console_sessions WHERE seen_ms < ? OR created_ms < ?",
            (now_ms - IDLE_MS, now_ms - ABSOLUTE_MS),
        )
        rows = await self.db.fetchall(
            "SELECT username, created_ms, seen_ms, remote FROM console_sessions ORDER BY seen_ms DESC"
        )
        return [(str(u), int(c), int(s), str(r)) for u, c, s, r in rows]
