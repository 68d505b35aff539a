"""Users of the wire-protocol server: names, roles and SCRAM-SHA-256 verifiers (never passwords).

The table lives in the ledger database beside the ledger's own tables but in its own ``MetaData``, created
with ``IF NOT EXISTS`` semantics (``checkfirst``), so it neither depends on nor changes the ledger schema.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dpgateway.errors import AuthenticationError, InvalidParameterError, PrivacyViolationError, UnknownTableError
from dpgateway.server.scram import Verifier, make_verifier, saslprep

users_metadata = sa.MetaData()
users_table = sa.Table(
    "dp_users",
    users_metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("verifier", sa.Text, nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.Float, nullable=False),
)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}")
MIN_PASSWORD_LENGTH = 8


class UnknownUserError(UnknownTableError):
    """``user passwd``/``user remove`` named a user that does not exist (SQLSTATE 42704)."""

    sqlstate = "42704"


@dataclass(frozen=True)
class User:
    name: str
    verifier: Verifier
    is_admin: bool
    created: float


class UserStore:
    """Add, change, remove and look up users in the ledger database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        users_metadata.create_all(engine, checkfirst=True)

    @classmethod
    def open(cls, url: str) -> UserStore:
        return cls(sa.create_engine(url))

    @classmethod
    def beside(cls, store: object, url: str) -> UserStore:
        """The users of the ledger ``store`` (its engine, so an in-memory ledger shares one database)."""
        engine = getattr(store, "engine", None)
        return cls(engine) if isinstance(engine, Engine) else cls.open(url)

    def get(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users_table).where(users_table.c.name == name)).first()
        if row is None:
            return None
        return User(row.name, Verifier.decode(row.verifier), bool(row.is_admin), float(row.created))

    def list(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(users_table).order_by(users_table.c.name)).all()
        return [User(r.name, Verifier.decode(r.verifier), bool(r.is_admin), float(r.created)) for r in rows]

    def add(self, name: str, password: str, *, admin: bool = False) -> User:
        check_name(name)
        verifier = make_verifier(check_password(password))
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(users_table.c.name).where(users_table.c.name == name)).first()
            if exists is not None:
                raise InvalidParameterError(
                    f'user "{name}" already exists; use `dpgateway user passwd {name}` to change the password'
                )
            now = time.time()
            conn.execute(
                sa.insert(users_table).values(name=name, verifier=verifier.encode(), is_admin=admin, created=now)
            )
        return User(name, verifier, admin, now)

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` matches their stored verifier (compared in constant time), else None."""
        user = self.get(name)
        if user is None:
            return None
        v = user.verifier
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), v.salt, v.iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        return user if hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key) else None

    def authenticate_admin(self, name: str, password: str) -> str:
        """The admin ``name`` if the password is theirs and they have the admin flag.

        A wrong password and an unknown name fail alike (28P01); a right password of a non-admin is 42501.
        """
        user = self.verify(name, password)
        if user is None:
            raise AuthenticationError(f'password authentication failed for user "{name}"')
        if not user.is_admin:
            raise PrivacyViolationError(
                f'user "{name}" is not an admin: admin actions need a user added with `dpgateway user add NAME --admin`'
            )
        return user.name

    def has_admin(self) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(sa.select(users_table.c.name).where(users_table.c.is_admin).limit(1)).first() is not None
            )

    def set_password(self, name: str, password: str) -> None:
        verifier = make_verifier(check_password(password))
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(users_table).where(users_table.c.name == name).values(verifier=verifier.encode())
            )
        if done.rowcount != 1:
            raise UnknownUserError(f'user "{name}" does not exist; add it with `dpgateway user add {name}`')

    def remove(self, name: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(sa.delete(users_table).where(users_table.c.name == name))
        if done.rowcount != 1:
            raise UnknownUserError(f'user "{name}" does not exist; `dpgateway user list` shows the users')


def read_password(prompt: str, from_stdin: bool | None = None) -> str:
    """A password: the next line of stdin with ``from_stdin`` (by default: under ``--password-stdin``, as the
    click context records it), else a hidden prompt."""
    import sys

    import click

    context = click.get_current_context(silent=True)
    if from_stdin is None:
        from_stdin = bool(context is not None and context.meta.get("password_stdin"))
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(click.prompt(prompt, hide_input=True))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidParameterError(
            f"user name {name!r} is not allowed: use 1-63 letters, digits, '_', '.', '@' or '-', "
            "not starting with '.', '@' or '-'"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidParameterError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password
