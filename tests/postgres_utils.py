"""A throw-away PostgreSQL server for the scale-out tests (test_postgres.py): Debian's postgresql, found or
installed with apt-get as root, initialised in a temporary directory and listening on 127.0.0.1 only, with a
password-protected role that owns the test databases."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from e2e_utils import apt_install, free_port

# Debian keeps the server binaries out of PATH, one folder per major version.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
ROLE = "brainlatent"
# The driver named in URLs: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; we install psycopg2.
DRIVER = "postgresql+psycopg2"


def _version_key(bindir: str) -> tuple[int, ...]:
    parts = Path(bindir).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir() -> Path | None:
    """The newest folder holding initdb, pg_ctl and postgres: Debian's layout first, then PATH."""
    candidates = sorted(glob.glob(DEBIAN_BIN_GLOB), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for bindir in candidates:
        if all(os.access(Path(bindir) / tool, os.X_OK) for tool in SERVER_TOOLS):
            return Path(bindir)
    return None


def find_or_install_postgres() -> tuple[Path | None, str]:
    """(folder of the server binaries, "") or (None, why not). Installs Debian's ``postgresql`` with apt-get when
    it is missing and we are root (CI), like e2e_utils does for Chromium."""
    bindir = find_bindir()
    if bindir:
        return bindir, ""
    why = apt_install("postgresql")
    if why:
        return None, f"no PostgreSQL server binaries (initdb, pg_ctl), and {why}"
    bindir = find_bindir()
    return (bindir, "") if bindir else (None, f"apt-get installed postgresql but no initdb under {DEBIAN_BIN_GLOB}")


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account Debian's package creates."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


@dataclass
class PostgresServer:
    """A running server: the role ``ROLE`` with ``password`` reaches it over TCP on 127.0.0.1:``port``."""

    bindir: Path
    datadir: Path
    port: int
    password: str
    user: str | None  # the account the server runs as (None: this process's own)

    @property
    def socket_dir(self) -> str:
        return str(self.datadir)

    def url(self, database: str) -> str:
        """A SQLAlchemy URL with the password in it: what a lab puts in an environment variable."""
        return f"{DRIVER}://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def admin(self, sql: str) -> None:
        """Run ``sql`` as the superuser over the data directory's Unix socket (trusted; TCP needs the password)."""
        import psycopg2

        conn = psycopg2.connect(host=self.socket_dir, port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """A fresh database owned by ``ROLE``; returns its URL."""
        self.admin(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        """Rows of ``sql`` run as ``ROLE`` over TCP with its password (what MLflow and Optuna do)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, password=self.password,
                                dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def log_tail(self, n: int = 3000) -> str:
        log = self.datadir / "server.log"
        return log.read_text(errors="replace")[-n:] if log.is_file() else "(no server log)"

    def stop(self) -> None:
        subprocess.run(self._as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast",
                                             "-w", "stop"]), capture_output=True, text=True, timeout=60)


def start_postgres(bindir: Path) -> PostgresServer:
    """initdb into a fresh temporary directory and start the server on a free port of 127.0.0.1.

    The superuser ``postgres`` can only log in over the data directory's socket; TCP connections need a password
    (scram-sha-256). The directory is made with mkdtemp, not under pytest's tmp dir: that one is private to root
    and the server runs as another account. fsync is off: the data is thrown away after the tests."""
    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="brainlatent-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    password = secrets.token_urlsafe(18)  # URL-safe: goes into connection URLs as is
    server = PostgresServer(bindir, base / "db", free_port(), password, user)

    def run(cmd: list[str], what: str) -> None:
        proc = subprocess.run(server._as_server_user(cmd), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n"
                               f"{server.log_tail()}")

    try:
        run([str(bindir / "initdb"), "-D", str(server.datadir), "-U", "postgres", "-E", "UTF8", "--locale=C",
             "--auth-local=trust", "--auth-host=scram-sha-256"], "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={server.datadir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run([str(bindir / "pg_ctl"), "-D", str(server.datadir), "-l", str(server.datadir / "server.log"),
             "-o", options, "-w", "-t", "60", "start"], "pg_ctl start")
        server.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
    except BaseException:
        stop_and_remove(server)
        raise
    return server


def stop_and_remove(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.datadir.parent, ignore_errors=True)
