"""Real database servers for the quiescer tests, from the Debian packages, each in a
temporary directory on a free port or a unix socket of its own. Nothing touches the
system's own instances. PostgreSQL and MariaDB refuse to run as root: they run as the
package's system user."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up within {timeout:g}s")
        time.sleep(0.1)


@dataclass
class Redis:
    port: int
    dir: Path
    password: str

    def client(self):
        import redis
        return redis.Redis(port=self.port, password=self.password)


@contextmanager
def redis_server(data_dir: Path, password: str = "s3cret", port: int | None = None) -> Iterator[Redis]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir,
                             "--requirepass", password, "--save", "", "--appendonly", "no", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Redis(port, data_dir, password)
    try:
        wait_until(lambda: server.client().ping(), 20, "redis-server")
        yield server
    finally:
        proc.terminate()
        proc.wait(20)


@dataclass
class Postgres:
    data: Path
    socket_dir: Path
    port: int

    def connect(self):
        import psycopg
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
                               autocommit=True)


def as_postgres(*argv) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *map(str, argv)]


def make_server_dir(path: Path, user: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # The tests' temporary directories are under /tmp/pytest-of-root: let the server through.
    for parent in path.parents:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    shutil.chown(path, user, user)
    path.chmod(0o700)
    return path


def make_postgres_dir(path: Path) -> Path:
    return make_server_dir(path, "postgres")


def initdb(data: Path, settings: dict[str, str]) -> None:
    make_postgres_dir(data)
    subprocess.run(as_postgres(PG_BIN / "initdb", "-D", data, "--auth=trust", "-U", "postgres"), check=True,
                   capture_output=True)
    with open(data / "postgresql.conf", "a") as f:
        f.writelines(f"{k} = '{v}'\n" for k, v in settings.items())


@contextmanager
def postgres_server(data: Path, socket_dir: Path, port: int | None = None) -> Iterator[Postgres]:
    """Run the cluster at `data` (already made) until the context ends."""
    make_postgres_dir(socket_dir)
    port = port or free_port()
    subprocess.run(as_postgres(PG_BIN / "pg_ctl", "-D", data, "-w", "-t", "60", "-l", socket_dir / "server.log",
                               "-o", f"-k {socket_dir} -p {port} -c listen_addresses=''", "start"), check=True,
                   capture_output=True)
    server = Postgres(data, socket_dir, port)
    try:
        yield server
    finally:
        subprocess.run(as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"),
                       capture_output=True)


@dataclass
class MariaDB:
    data: Path
    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "mysqld.sock"

    @property
    def log(self) -> Path:
        return self.run_dir / "server.log"

    def connect(self, user: str = "root", password: str = "", **kwargs):
        import pymysql
        return pymysql.connect(unix_socket=str(self.socket), user=user, password=password, autocommit=True,
                               **kwargs)


# Small InnoDB files: every snapshot of an rsync volume copies the redo log again.
MARIADB_OPTIONS = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M"]


def install_mariadb(data: Path) -> None:
    """A new data directory whose root@localhost has no password (PyMySQL cannot speak
    the unix_socket plugin the package's default would give it)."""
    make_server_dir(data, "mysql")
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=mysql",
                    "--auth-root-authentication-method=normal", "--skip-test-db", *MARIADB_OPTIONS],
                   check=True, capture_output=True)


@contextmanager
def mariadb_server(data: Path, run_dir: Path) -> Iterator[MariaDB]:
    """Run the data directory at `data` (already made, owned by mysql) until the context
    ends, without networking, with the binary log beside the data so that a copy of the
    directory has it too."""
    make_server_dir(run_dir, "mysql")
    server = MariaDB(data, run_dir)
    # --no-defaults first: nothing of the system's /etc/mysql applies.
    proc = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={server.socket}",
                             f"--pid-file={run_dir / 'mysqld.pid'}", f"--log-error={server.log}",
                             "--skip-networking", "--log-bin=mariadb-bin", "--server-id=1", *MARIADB_OPTIONS],
                            user="mysql", group="mysql", extra_groups=[], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mariadbd exited ({proc.returncode}): {server.log.read_text()[-2000:]}")
            try:
                server.connect().close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: a clean shutdown
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
