"""A real PostgreSQL server on loopback, started for the distributed-search tests.

Installed by ``scripts/setup.sh`` (Debian's ``postgresql``). As root the server runs as the
``postgres`` user, as PostgreSQL refuses to run as root. Missing binaries skip the tests on a
developer's machine but fail them in CI, where the server must be tested.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries not found; scripts/setup.sh installs postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, the driver the `postgres` extra installs.
    pytest.importorskip("psycopg")
    # Not under pytest's tmp dir: that is private to root (0700), and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="autosplit-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        os.chmod(root, 0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [
            *as_user,
            initdb,
            "-D",
            str(data),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        import psycopg

        deadline = time.time() + 30
        while True:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
                )
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        conn.execute("CREATE DATABASE autosplit")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/autosplit"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory) -> Path:
    """A runs dir whose digits teacher is already trained, so workers start at once."""
    from autosplit.cli import main

    runs = tmp_path_factory.mktemp("runs")
    space = Path(__file__).resolve().parents[2] / "search_spaces" / "digits_tiny.yaml"
    assert (
        main(
            [
                "teacher",
                "--space",
                str(space),
                "--runs-dir",
                str(runs),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    return runs
