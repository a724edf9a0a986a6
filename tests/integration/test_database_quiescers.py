"""The database quiescers against real servers: a writer keeps moving money between
accounts while snapshots are taken; each snapshot, started as a server of its own, must
come up cleanly with the ledger's total unchanged."""

import subprocess
import sys
import time
from datetime import timedelta

import pytest

from snapmgr.quiesce.base import Context, Spec
from snapmgr.quiesce.mysql import MysqlQuiescer
from tests.integration.helpers import loop_mount, needs_root
from tests.integration.servers import (initdb, install_mariadb, make_postgres_dir, mariadb_server, postgres_server,
                                       redis_server, wait_until)

ACCOUNTS, TOTAL = 20, 20_000


def created(r) -> dict:
    return r.json()["results"][0]["created"]


def password_file(ws, secret: str):
    path = ws.root / "password"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


# Redis ---------------------------------------------------------------------------------

REDIS_WRITER = r"""
import random, sys, redis
r = redis.Redis(port=int(sys.argv[1]), password=sys.argv[2])
while True:
    a, b = random.sample(range(%d), 2)
    amount = random.randint(1, 50)
    pipe = r.pipeline(transaction=True)  # MULTI/EXEC: a dump sees both or neither
    pipe.decrby(f"account:{a}", amount).incrby(f"account:{b}", amount).incr("transfers").execute()
""" % ACCOUNTS


def test_redis_snapshots_hold_a_fresh_complete_dump(ws, tmp_path):
    with redis_server(tmp_path / "redis") as server:
        r = server.client()
        r.mset({f"account:{i}": TOTAL // ACCOUNTS for i in range(ACCOUNTS)})
        redis_volume(ws, server)
        writer = subprocess.Popen([sys.executable, "-c", REDIS_WRITER, str(server.port), server.password])
        try:
            snapshots = []
            for _ in range(3):
                time.sleep(0.2)
                before = int(r.get("transfers") or 0)
                snapshots.append((created(ws.ok("--json", "snapshot", "cache")), before))
        finally:
            writer.kill()
            writer.wait()
    for snap, transfers_before in snapshots:
        assert snap["grade"] == "application"
        assert snap["consistency"]["quiescers"]["redis"]["rdb_last_save_time"] > 0
        restored = tmp_path / f"restored-{snap['id'].replace('@', '-')}"
        restored.mkdir()
        (restored / "dump.rdb").write_bytes((ws.repo / snap["id"] / "dump.rdb").read_bytes())
        with redis_server(restored) as copy:
            c = copy.client()
            assert sum(int(c.get(f"account:{i}")) for i in range(ACCOUNTS)) == TOTAL
            assert int(c.get("transfers")) >= transfers_before  # the dump was taken after prepare began


def redis_volume(ws, server) -> None:
    ws.write_config({"cache": {"backend": "rsync", "source": server.dir, "repository": ws.repo, "quiesce": ["redis"]}},
                    quiesce={"redis": {"kind": "redis", "port": server.port,
                                       "password_file": password_file(ws, server.password)}})


def test_a_redis_save_already_running_is_waited_for_and_followed_by_a_fresh_one(ws, tmp_path):
    with redis_server(tmp_path / "redis") as server:
        r = server.client()
        r.mset({f"k{i}": i for i in range(20)})
        r.config_set("rdb-key-save-delay", 100_000)  # 0.1 s a key: a save of 2 s
        redis_volume(ws, server)
        saves = r.info("persistence")["rdb_saves"]
        r.bgsave(schedule=False)
        r.set("late", "written after that save began")
        snap = created(ws.ok("--json", "snapshot", "cache"))
        assert snap["grade"] == "application" and r.info("persistence")["rdb_saves"] == saves + 2
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "dump.rdb").write_bytes((ws.repo / snap["id"] / "dump.rdb").read_bytes())
    with redis_server(restored) as copy:
        assert copy.client().get("late") == b"written after that save began"


@needs_root
def test_a_failing_redis_save_is_reported_also_when_the_last_one_failed_too(ws, tmp_path):
    with redis_server(tmp_path / "redis") as server:
        r = server.client()
        redis_volume(ws, server)
        subprocess.run(["chattr", "+i", server.dir], check=True)  # no dump can be written, even by root
        try:
            r.bgsave(schedule=False)
            wait_until(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err", 20, "the failed save")
            result = ws.run("snapshot", "cache")
        finally:
            subprocess.run(["chattr", "-i", server.dir], check=True)
    assert result.returncode == 1 and "BGSAVE failed (rdb_last_bgsave_status:err)" in result.stderr
    assert ws.snapshots() == []


def test_a_redis_password_file_readable_by_others_is_refused(ws, tmp_path):
    secret = password_file(ws, "x")
    secret.chmod(0o644)
    ws.write_config({"cache": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["redis"]}},
                    quiesce={"redis": {"kind": "redis", "password_file": secret}})
    r = ws.run("snapshot")
    assert r.returncode == 78 and f"quiesce.redis.password_file: {secret}: is readable by group or others" in r.stderr


def test_a_missing_password_file_is_a_config_error(ws):
    ws.write_config({"cache": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["redis"]}},
                    quiesce={"redis": {"kind": "redis", "password_file": ws.root / "nope"}})
    r = ws.run("config", "check")
    assert r.returncode == 78 and "quiesce.redis.password_file:" in r.stderr and "does not exist" in r.stderr


# PostgreSQL ----------------------------------------------------------------------------

PG_WRITER = r"""
import random, sys, psycopg
db = psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="postgres", dbname="postgres", autocommit=True)
while True:
    a, b = random.sample(range(%d), 2)
    amount = random.randint(1, 50)
    with db.transaction():
        db.execute("UPDATE ledger SET balance = balance - %%s WHERE id = %%s", (amount, a))
        db.execute("UPDATE ledger SET balance = balance + %%s WHERE id = %%s", (amount, b))
""" % ACCOUNTS


@needs_root
def test_postgres_backup_mode_snapshots_of_a_live_cluster_recover_with_the_ledger_balanced(ws, tmp_path):
    """An rsync volume is no atomic snapshot: its copy is only consistent through the
    backup label pg_backup_stop() returned, replayed with the archived WAL."""
    data, archive = tmp_path / "pg" / "data", make_postgres_dir(tmp_path / "archive")
    initdb(data, {"archive_mode": "on", "archive_command": f"cp %p {archive}/%f", "wal_level": "replica"})
    with postgres_server(data, tmp_path / "sock") as server:
        with server.connect() as db:
            db.execute("CREATE TABLE ledger (id int PRIMARY KEY, balance int NOT NULL)")
            db.execute("INSERT INTO ledger SELECT i, %s FROM generate_series(0, %s) i", (TOTAL // ACCOUNTS, ACCOUNTS - 1))
        ws.write_config({"db": {"backend": "rsync", "source": data, "repository": ws.repo, "quiesce": ["pg"]}},
                        quiesce={"pg": {"kind": "postgres", "host": str(server.socket_dir), "port": server.port}})
        writer = subprocess.Popen([sys.executable, "-c", PG_WRITER, str(server.socket_dir), str(server.port)])
        try:
            time.sleep(0.5)
            snapshots = [created(ws.ok("--json", "snapshot", "db")) for _ in range(2)]
        finally:
            writer.kill()
            writer.wait()
    for snap in snapshots:
        kept = snap["consistency"]["quiescers"]["pg"]
        assert snap["grade"] == "application" and kept["mode"] == "backup" and kept["wal_archived"]
        assert kept["backup_label"].startswith("START WAL LOCATION") and f"LABEL: snapmgr {snap['id']}" in kept["backup_label"]
        restored = tmp_path / f"restored-{snap['id'].replace('@', '-')}"
        subprocess.run(["cp", "-a", ws.repo / snap["id"], restored], check=True)
        (restored / "postmaster.pid").unlink(missing_ok=True)
        (restored / "backup_label").write_text(kept["backup_label"])
        (restored / "recovery.signal").touch()
        with open(restored / "postgresql.conf", "a") as f:
            f.write(f"restore_command = 'cp {archive}/%f %p'\nrecovery_target = 'immediate'\n"
                    f"recovery_target_action = 'promote'\narchive_mode = 'off'\n")
        subprocess.run(["chown", "-R", "postgres:postgres", restored], check=True)
        with postgres_server(restored, tmp_path / f"sock-{restored.name[-8:]}") as copy, copy.connect() as db:
            # Connections open once recovery reached a consistent state; the promotion follows.
            wait_until(lambda: not db.execute("SELECT pg_is_in_recovery()").fetchone()[0], 30, "the promotion")
            assert db.execute("SELECT sum(balance), count(*) FROM ledger").fetchone() == (TOTAL, ACCOUNTS)


# MariaDB -------------------------------------------------------------------------------

MARIADB_WRITER = r"""
import random, sys, pymysql
db = pymysql.connect(unix_socket=sys.argv[1], user="root", database="bank")
with db.cursor() as c:
    while True:
        a, b = random.sample(range(%d), 2)
        amount = random.randint(1, 50)
        c.execute("UPDATE ledger SET balance = balance - %%s WHERE id = %%s", (amount, a))
        c.execute("UPDATE ledger SET balance = balance + %%s WHERE id = %%s", (amount, b))
        c.execute("UPDATE transfers SET n = n + 1")
        db.commit()
""" % ACCOUNTS


@needs_root
def test_a_postgres_backup_that_cannot_start_is_refused_in_one_line_with_nothing_to_stop(ws, tmp_path):
    data = tmp_path / "pg" / "data"
    initdb(data, {"wal_level": "minimal", "max_wal_senders": "0"})  # no online backup possible
    with postgres_server(data, tmp_path / "sock") as server:
        ws.write_config({"db": {"backend": "rsync", "source": data, "repository": ws.repo, "quiesce": ["pg"]}},
                        quiesce={"pg": {"kind": "postgres", "host": str(server.socket_dir), "port": server.port}})
        r = ws.run("snapshot", "db")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "quiescer pg (postgres): SELECT pg_backup_start: WAL level not sufficient" in r.stderr
    assert "resum" not in r.stderr.replace("everything was resumed", "")  # no stop of a backup never started
    assert ws.snapshots() == []


def make_bank(server, password: str) -> None:
    """The ledger, and a user with only what the quiescer needs: RELOAD for BACKUP STAGE,
    BINLOG MONITOR for the binlog position."""
    with server.connect() as db, db.cursor() as c:
        c.execute("CREATE DATABASE bank")
        c.execute("CREATE TABLE bank.ledger (id int PRIMARY KEY, balance int NOT NULL) ENGINE=InnoDB")
        c.executemany("INSERT INTO bank.ledger VALUES (%s, %s)", [(i, TOTAL // ACCOUNTS) for i in range(ACCOUNTS)])
        c.execute("CREATE TABLE bank.transfers (n int NOT NULL) ENGINE=InnoDB")
        c.execute("INSERT INTO bank.transfers VALUES (0)")
        c.execute("CREATE USER snapmgr@localhost IDENTIFIED BY %s", (password,))
        c.execute("GRANT RELOAD, BINLOG MONITOR ON *.* TO snapmgr@localhost")


def query(server, statement: str) -> tuple:
    with server.connect() as db, db.cursor() as c:
        c.execute(statement)
        return c.fetchone()


@needs_root
def test_mariadb_snapshots_of_a_live_server_start_with_the_ledger_balanced(ws, tmp_path):
    """Commits wait while btrfs takes the snapshot; a copy of it then starts as after a
    crash, at the binlog position and GTID its record names."""
    secret = "s3cret"
    with loop_mount(tmp_path, "btrfs", size_mib=600) as mnt:
        data, snapshots = mnt / "mariadb", mnt / ".snapshots"
        subprocess.run(["btrfs", "subvolume", "create", data], check=True, capture_output=True)
        install_mariadb(data)
        with mariadb_server(data, tmp_path / "mysqld") as server:
            make_bank(server, secret)
            ws.write_config({"db": {"backend": "btrfs", "subvolume": data, "snapshot_dir": snapshots,
                                    "quiesce": ["mysql"]}},
                            quiesce={"mysql": {"kind": "mysql", "socket": server.socket, "user": "snapmgr",
                                               "password_file": password_file(ws, secret)}})
            writer = subprocess.Popen([sys.executable, "-c", MARIADB_WRITER, str(server.socket)])
            try:
                transfers_before = {}
                for _ in range(3):
                    time.sleep(0.3)
                    before = query(server, "SELECT n FROM bank.transfers")[0]
                    transfers_before[created(ws.ok("--json", "snapshot", "db"))["id"]] = before
                assert writer.poll() is None, "the writer died"
            finally:
                writer.kill()
                writer.wait()
        listed = {s["id"]: s for s in ws.ok("--json", "list", "db").json()["snapshots"]}
        assert set(listed) == set(transfers_before)
        for sid, before in transfers_before.items():
            kept = listed[sid]["consistency"]["quiescers"]["mysql"]
            assert listed[sid]["grade"] == "application" and "MariaDB" in kept["server_version"]
            assert kept["binlog_file"].startswith("mariadb-bin.") and kept["gtid"].startswith("0-1-")
            # Commits were held while the snapshot was taken: its binary log ends where the record says.
            assert (snapshots / sid / kept["binlog_file"]).stat().st_size == kept["binlog_position"]
            restored = tmp_path / f"restored-{sid.replace('@', '-')}"
            subprocess.run(["cp", "-a", snapshots / sid, restored], check=True)
            subprocess.run(["chown", "-R", "mysql:mysql", restored], check=True)
            with mariadb_server(restored, tmp_path / f"mysqld-{restored.name[-8:]}") as copy:
                assert query(copy, "SELECT SUM(balance), COUNT(*) FROM bank.ledger") == (TOTAL, ACCOUNTS)
                assert query(copy, "SELECT n FROM bank.transfers")[0] >= before  # taken after the snapshot began
                assert query(copy, "SELECT @@GLOBAL.gtid_binlog_pos") == (kept["gtid"],)
                assert query(copy, "CHECK TABLE bank.ledger")[2:] == ("status", "OK")
            errors = [line for line in copy.log.read_text().splitlines() if "[ERROR]" in line]
            assert not errors, errors


def test_mysql_on_a_volume_copied_by_rsync_is_refused_before_anything_is_paused(ws):
    ws.write_config({"db": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["mysql"]}},
                    quiesce={"mysql": {"kind": "mysql", "required": False}})
    r = ws.run("snapshot", "db")
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert "quiesce.mysql.kind: db is copied file by file (rsync)" in r.stderr and ws.snapshots() == []


def test_a_missing_driver_is_one_line_naming_the_extra_to_install(ws, tmp_path):
    shadow = tmp_path / "shadow" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    ws.env["PYTHONPATH"] = f"{shadow.parent}:{ws.env['PYTHONPATH']}"
    ws.write_config({"db": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["pg"]}},
                    quiesce={"pg": {"kind": "postgres", "required": False}})  # optional, and still an error
    r = ws.run("snapshot", "db")
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert "quiesce.pg.kind: postgres needs psycopg 3, which is not installed: pip install 'snapmgr[postgres]'" \
        in r.stderr


@needs_root
def test_mariadb_backup_stages_hold_commits_only_while_prepared(tmp_path):
    import pymysql
    data = tmp_path / "mariadb"
    install_mariadb(data)
    with mariadb_server(data, tmp_path / "mysqld") as server, server.connect() as db, db.cursor() as c:
        make_bank(server, "unused")
        c.execute("SET SESSION lock_wait_timeout = 1")
        quiescer = MysqlQuiescer(Spec("mysql", "mysql", timedelta(seconds=10), True, timedelta(seconds=60),
                                      {"socket": server.socket, "user": "root", "password_file": None}),
                                 Context(tmp_path / "snapmgr.toml", ("db",), ("db@x",), False, {}))
        quiescer.open()
        try:
            quiescer.prepare()
            c.execute("BEGIN")
            c.execute("UPDATE bank.transfers SET n = n + 1")
            with pytest.raises(pymysql.err.OperationalError, match="Lock wait timeout"):
                c.execute("COMMIT")
            c.execute("ROLLBACK")
            assert query(server, "SELECT n FROM bank.transfers") == (0,)  # reads go on
            quiescer.resume()
            # Committed while the quiescer's session is still open: resume() released the stage.
            c.execute("UPDATE bank.transfers SET n = n + 1")
            assert query(server, "SELECT n FROM bank.transfers") == (1,)
        finally:
            quiescer.resume()
            quiescer.close()
        assert quiescer.record()["binlog_file"] == "mariadb-bin.000001"


@needs_root
def test_a_mariadb_prepare_failing_half_way_is_resumed_and_refused_in_one_line(ws, tmp_path):
    data = tmp_path / "mariadb"
    install_mariadb(data)
    with mariadb_server(data, tmp_path / "mysqld") as server:
        make_bank(server, "unused")
        with server.connect() as db, db.cursor() as c:  # BACKUP STAGE works, SHOW MASTER STATUS does not
            c.execute("CREATE USER halfway@localhost IDENTIFIED BY 'pw'")
            c.execute("GRANT RELOAD ON *.* TO halfway@localhost")
        with loop_mount(tmp_path, "btrfs") as mnt:  # an atomic volume: mysql refuses rsync copies
            subprocess.run(["btrfs", "subvolume", "create", mnt / "data"], check=True, capture_output=True)
            ws.write_config({"db": {"backend": "btrfs", "subvolume": mnt / "data", "snapshot_dir": mnt / ".snapshots",
                                    "quiesce": ["mysql"]}},
                            quiesce={"mysql": {"kind": "mysql", "socket": server.socket, "user": "halfway",
                                               "password_file": password_file(ws, "pw")}})
            r = ws.run("snapshot", "db")
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert "SHOW MASTER STATUS: Access denied" in r.stderr and "everything was resumed" in r.stderr
            assert ws.snapshots("db") == []
