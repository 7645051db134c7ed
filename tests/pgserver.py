"""A throwaway PostgreSQL server for the tests: Debian's ``initdb`` and ``pg_ctl`` in a temporary folder.

The server listens on 127.0.0.1 only, on a free port, with its unix socket in its own folder (never
the system's), ``fsync`` off (a test database need not survive a power loss) and password
authentication on TCP (scram-sha-256), so the tests connect as the gateway will: host, port, user,
password. PostgreSQL refuses to run as root: when the tests run as root, ``initdb`` and ``pg_ctl``
run as the ``postgres`` system user (Debian's package creates it), and the folder is handed to it.

Nothing here assumes a server already running, and nothing outside the temporary folder is touched.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

SKIP_ENV = "ISO_GATEWAY_PG_TESTS_SKIP"  # "1": skip the PostgreSQL tests when the binaries are missing
SUPERUSER = "gateway_test"


class PgServerUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed (Debian: ``apt-get install postgresql``)."""


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: ``pg_config --bindir``, else the newest of
    /usr/lib/postgresql/*/bin, else the PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(Path(p).parent.name))
    candidates.extend(Path(p) for p in reversed(versions))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PgServerUnavailable(
        "PostgreSQL's initdb and pg_ctl were not found (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH): "
        "install Debian's postgresql package (.ci/run does), or set "
        f"{SKIP_ENV}=1 to skip the PostgreSQL tests")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server: ``start()``, then ``conninfo(dbname)``; ``stop()`` ends it and removes its folder."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="iso-gateway-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.logfile = self.root / "server.log"
        self.password = secrets.token_urlsafe(18)
        self.user = SUPERUSER
        self.host = "127.0.0.1"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self.running = False

    # -- running the binaries

    def _postgres_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise PgServerUnavailable(
                "the tests run as root, and PostgreSQL refuses to: they run it as the 'postgres' user, "
                "which does not exist (Debian's postgresql package creates it)") from None

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        preexec: Callable[[], None] | None = None
        if self._as_postgres:
            entry = self._postgres_user()
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", "postgres", "--", *cmd]
            else:  # no util-linux: drop to the user in the child before exec

                def preexec() -> None:
                    os.setgroups([])
                    os.setgid(entry.pw_gid)
                    os.setuid(entry.pw_uid)

        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, env=env,
                              preexec_fn=preexec)
        if done.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")
        return done

    def start(self) -> PgServer:
        self.sockets.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as_postgres:
            entry = self._postgres_user()
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(["initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])
        pwfile.unlink()
        for attempt in range(5):  # a free port can be taken between the probe and the server's bind
            self.port = free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.sockets}'", "fsync": "off", "synchronous_commit": "off",
                "full_page_writes": "off", "max_connections": "100", "shared_buffers": "32MB",
                "log_min_messages": "warning", "logging_collector": "off",
            }
            with open(self.data / "postgresql.auto.conf", "a") as conf:
                conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
            try:
                self._run(["pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60"])
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
                continue
            self.running = True
            atexit.register(self.destroy)  # a session cut short still stops its server
            return self
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (it can be started again with ``restart``)."""
        if self.running:
            self._run(["pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60"])
            self.running = False

    def restart(self) -> None:
        """Start a stopped server again, on the same port."""
        self._run(["pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60"])
        self.running = True

    def destroy(self) -> None:
        """Stop the server (if it runs) and remove its folder; safe to call twice."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.destroy)

    # -- connecting

    def conninfo(self, dbname: str = "postgres") -> str:
        return (f"host={self.host} port={self.port} dbname={dbname} user={self.user} "
                f"password={self.password} connect_timeout=5")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its name."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name
