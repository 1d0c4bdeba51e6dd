"""A throwaway PostgreSQL server for the tests and ``bench/``: ``initdb`` in a temporary
directory, ``pg_ctl start`` with a Unix socket there and no TCP (``listen_addresses=''``),
fsync off; nothing of the system's PostgreSQL (service, cluster, port) is touched.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user
(Debian's package creates it), else ``nobody``, through ``runuser``; the directory is
made theirs. Missing binaries are an error saying how to install them, never a skip.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

#: Where Debian's ``postgresql`` package puts the server binaries (newest first).
BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
            "/usr/lib/postgresql/15/bin")
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                f"{', '.join(BIN_DIRS)} or on PATH: install Debian's postgresql package "
                "(sudo apt-get update && sudo apt-get install -y postgresql), or run "
                "scripts/test as root to have it installed")
_counter = itertools.count(1)


def find_bin_dir() -> Path:
    for folder in BIN_DIRS:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    raise RuntimeError(INSTALL_HINT)


def _run_as() -> str | None:
    """The user the server runs as when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists "
                       "to run initdb as: create one (adduser --system postgres)")


class PgServer:
    """One PostgreSQL server in its own temporary directory (see the module docstring)."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: keep fsync on (``bench/``: figures comparable with SQLite FULL)."""
        self.bin = find_bin_dir()
        self.user = _run_as()
        self.base = Path(tempfile.mkdtemp(prefix="fs-cc360-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base
        self.log = self.base / "server.log"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        os.chmod(self.base, 0o755)
        self._cmd(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# fs-cc360 tests\nlisten_addresses = ''\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       + ("" if durable else "fsync = off\nfull_page_writes = off\n")
                       + "max_connections = 200\nshared_buffers = 64MB\n")
        self.running = False

    def _cmd(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        full = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            full = ["runuser", "-u", self.user, "--", *full]
        done = subprocess.run(full, capture_output=True, text=True, timeout=120,
                              cwd=self.base)
        if check and done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): "
                               f"{done.stdout}{done.stderr}{log[-2000:]}")
        return done

    def start(self) -> None:
        self._cmd(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                   "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        if self.running:
            self._cmd(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"],
                      check=False)
            self.running = False

    def url(self, dbname: str) -> str:
        """The ``[outbox] database`` URL of ``dbname`` on this server (Unix socket)."""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
