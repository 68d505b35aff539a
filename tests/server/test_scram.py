"""SCRAM-SHA-256 server side against the RFC 7677 test vector, and the users table."""

from __future__ import annotations

import base64

import pytest
import sqlalchemy as sa

from dpgateway.budget_store.users import UnknownUserError, UserStore
from dpgateway.errors import InvalidParameterError
from dpgateway.server import scram

# RFC 7677 section 3: user "user", password "pencil".
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_vector() -> None:
    verifier = scram.make_verifier("pencil", salt=SALT)
    exchange = scram.ServerExchange(verifier, nonce=SERVER_NONCE)
    assert exchange.first(CLIENT_FIRST) == SERVER_FIRST
    assert exchange.final(CLIENT_FINAL) == SERVER_FINAL


def test_verifier_round_trips_and_holds_no_password() -> None:
    verifier = scram.make_verifier("pencil", salt=SALT)
    text = verifier.encode()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$") and "pencil" not in text
    assert scram.Verifier.decode(text) == verifier
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        scram.Verifier.decode("md5abc")


def test_wrong_password_fails() -> None:
    exchange = scram.ServerExchange(scram.make_verifier("not pencil", salt=SALT), nonce=SERVER_NONCE)
    exchange.first(CLIENT_FIRST)
    with pytest.raises(scram.ScramError, match="password authentication failed") as info:
        exchange.final(CLIENT_FINAL)
    assert not info.value.malformed


def test_libpq_empty_user_name_is_accepted() -> None:
    exchange = scram.ServerExchange(scram.make_verifier("pencil", salt=SALT), nonce=SERVER_NONCE)
    assert exchange.first(b"n,,n=,r=abc").startswith(b"r=abc" + SERVER_NONCE.encode())


def test_unknown_user_exchange_looks_like_a_real_one() -> None:
    secret = b"s" * 32
    fake = scram.fake_verifier(secret, "mallory")
    assert fake == scram.fake_verifier(secret, "mallory")  # the same salt on every try, like a real user
    assert fake.salt != scram.fake_verifier(secret, "eve").salt
    assert fake.iterations == scram.DEFAULT_ITERATIONS and len(fake.salt) == 16
    exchange = scram.ServerExchange(fake, nonce=SERVER_NONCE)
    first = exchange.first(CLIENT_FIRST)
    assert first.startswith(b"r=rOprNGfwEbeRWgbNEkqO" + SERVER_NONCE.encode() + b",s=")
    assert first.endswith(b",i=4096")
    with pytest.raises(scram.ScramError, match="password authentication failed"):
        exchange.final(
            CLIENT_FINAL.replace(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", b"r=" + first[2:].split(b",")[0]
            )
        )


@pytest.mark.parametrize(
    ("first", "final", "match"),
    [
        (b"p=tls-server-end-point,,n=,r=x", b"", "channel binding is not offered"),
        (b"n,a=admin,n=,r=x", b"", "gs2 header"),
        (b"n,,r=x", b"", "client-first-bare"),
        (b"n,,n=,r=", b"", "nonce"),
        (CLIENT_FIRST, b"c=biws,r=wrong,p=AAAA", "nonce does not match"),
        (CLIENT_FIRST, b"c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AAAA", "channel binding check"),
        (CLIENT_FIRST, b"c=biws,r=x", "client-final"),
        (CLIENT_FIRST, b"c=biws,r=x,p=!!", "base64"),
    ],
)
def test_malformed_messages(first: bytes, final: bytes, match: str) -> None:
    exchange = scram.ServerExchange(scram.make_verifier("pencil", salt=SALT), nonce=SERVER_NONCE)
    with pytest.raises(scram.ScramError, match=match) as info:
        exchange.first(first)
        exchange.final(final)
    assert info.value.malformed


def test_saslprep() -> None:
    assert scram.saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
    assert scram.saslprep("\u2168") == "IX"  # NFKC
    assert scram.saslprep("a\u00a0b") == "a b"  # non-ASCII space to space
    assert scram.saslprep("a\x07b") == "a\x07b"  # prohibited: used unchanged, as libpq does


def test_users_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    users = UserStore(engine)
    users.add("alice", "correct horse")
    users.add("root", "battery staple", admin=True)
    assert [(u.name, u.is_admin) for u in UserStore(engine).list()] == [("alice", False), ("root", True)]
    with engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.execute(sa.text("SELECT * FROM dp_users")) for v in row)
    assert "correct horse" not in stored and "SCRAM-SHA-256$4096:" in stored
    before = users.get("alice")
    users.set_password("alice", "new password")
    assert users.get("alice") != before
    users.remove("alice")
    assert users.get("alice") is None
    with pytest.raises(UnknownUserError, match='user "alice" does not exist'):
        users.remove("alice")
    with pytest.raises(InvalidParameterError, match='user "root" already exists'):
        users.add("root", "whatever123")
    with pytest.raises(InvalidParameterError, match="at least 8 characters"):
        users.add("bob", "short")
    with pytest.raises(InvalidParameterError, match="is not allowed"):
        users.add("-x", "long enough")
