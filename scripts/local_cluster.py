"""A throw-away cluster on one machine: PostgreSQL and Redis on 127.0.0.1 (temporary data dirs, free
non-default ports) and N Celery workers, for trying ``orchestration.cluster`` and for tests/test_cluster.py.

    python scripts/local_cluster.py up [--workers 2] [--dir DIR]   # prints the environment, Ctrl-C stops all

Missing pieces are installed: the Debian packages ``postgresql`` and ``redis-server`` (apt-get, as root or
with password-less sudo) and this project's ``cluster`` extra (pip). Failures raise ``ClusterSetupError``
with the installer's output. PostgreSQL refuses to run as root: as root the server runs as the ``postgres``
system user (created by the Debian package). Every process started here is stopped by the context
managers, by its own process id (workers: their own process group).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_MODULES = ("dagster_postgres", "dagster_celery", "redis", "psycopg2")


class ClusterSetupError(RuntimeError):
    """Something the local cluster needs could not be installed or started."""


# --- installing -------------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The PostgreSQL server binaries (Debian: /usr/lib/postgresql/<version>/bin), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _run(command: list[str], what: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ClusterSetupError(f"{what}: {' '.join(command)} failed: {error}") from error
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise ClusterSetupError(f"{what}: {' '.join(command)} exited {done.returncode}:\n{tail}")
    return done.stdout


def missing_prerequisites() -> list[str]:
    """What ``install`` would install: Debian packages without their binaries, and the cluster extra's modules
    that cannot be imported."""
    packages = [
        pkg
        for pkg, present in (("postgresql", postgres_bindir()), ("redis-server", shutil.which("redis-server")))
        if not present
    ]
    return packages + [name for name in CLUSTER_MODULES if importlib.util.find_spec(name) is None]


def ensure_debian_packages() -> list[str]:
    """Install ``postgresql`` / ``redis-server`` with apt-get when their binaries are missing; returns the
    packages installed. Raises ``ClusterSetupError`` when that is impossible (no apt, no root, no network)."""
    missing = [
        pkg
        for pkg, present in (("postgresql", postgres_bindir()), ("redis-server", shutil.which("redis-server")))
        if not present
    ]
    if not missing:
        return []
    if not shutil.which("apt-get"):
        raise ClusterSetupError(f"{', '.join(missing)} missing and there is no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        raise ClusterSetupError(f"{', '.join(missing)} missing; installing needs root or password-less sudo")
    env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    install = [*sudo, *env_prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        _run(install, "apt-get install")
    except ClusterSetupError:  # stale or absent package lists: refresh once
        _run([*sudo, *env_prefix, "apt-get", "update", "-q"], "apt-get update")
        _run(install, "apt-get install")
    still = [
        p for p, ok in (("postgresql", postgres_bindir()), ("redis-server", shutil.which("redis-server"))) if not ok
    ]
    if still:
        raise ClusterSetupError(f"apt-get reported success but {', '.join(still)} is still missing")
    return missing


def ensure_cluster_extra() -> bool:
    """Import the ``cluster`` extra's modules, pip-installing ``.[cluster]`` into this interpreter's
    environment when one is missing; returns whether it installed. Raises ``ClusterSetupError``."""

    def missing() -> list[str]:
        importlib.invalidate_caches()
        gone = []
        for name in CLUSTER_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:
                gone.append(name)
        return gone

    if not missing():
        return False
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f"{ROOT}[cluster]"],
        "pip install",
    )
    if still := missing():
        raise ClusterSetupError(f"pip installed .[cluster] but {', '.join(still)} still cannot be imported")
    return True


# --- services ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterSetupError(f"exited {proc.returncode} before listening on {port}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise ClusterSetupError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False, timeout: float = 30) -> None:
    """Stop a process this module started (its process group when ``group``), then kill it if it hangs."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait(10)


def _service_dir(parent: Path, name: str, owner: str | None) -> Path:
    """A fresh directory the service's user can reach (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix=f"weightlens-{name}-", dir=parent))
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db_name: str
    data_dir: Path
    log: Path

    def env(self) -> dict[str, str]:
        """The variables deploy/celery/dagster.yaml reads."""
        return {
            "WEIGHTLENS_PG_HOST": self.host,
            "WEIGHTLENS_PG_PORT": str(self.port),
            "WEIGHTLENS_PG_USER": self.user,
            "WEIGHTLENS_PG_PASSWORD": self.password,
            "WEIGHTLENS_PG_DB": self.db_name,
        }


@contextlib.contextmanager
def postgres(parent: Path, db_name: str = "dagster") -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1:<free port>, password (scram) auth, data in a temporary dir; as
    root it runs as the ``postgres`` system user. Removed on exit."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ClusterSetupError("PostgreSQL server binaries not found (ensure_debian_packages first)")
    as_root = os.geteuid() == 0
    owner = "postgres" if as_root else None
    if as_root:
        try:
            pwd.getpwnam(owner)
        except KeyError as error:
            raise ClusterSetupError("running as root and there is no 'postgres' user to run the server as") from error
    user_kw = {"user": owner, "group": pwd.getpwnam(owner).pw_gid, "extra_groups": []} if as_root else {}
    base = _service_dir(parent, "pg", owner)
    data, log, pwfile = base / "data", base / "postgres.log", base / "pwfile"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if owner:
        os.chown(pwfile, pwd.getpwnam(owner).pw_uid, -1)
    env = {**os.environ, "HOME": str(base), "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "weightlens",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=base,
        **user_kw,
    )
    pwfile.unlink()
    if done.returncode != 0:
        raise ClusterSetupError(f"initdb exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    port = free_port()
    with open(log, "w") as out:
        if owner:
            os.chown(log, pwd.getpwnam(owner).pw_uid, -1)
        proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={base}",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=base,
            **user_kw,
        )
    try:
        wait_for_port(port, proc, log)
        import psycopg2

        deadline = time.monotonic() + 30
        while True:
            try:
                con = psycopg2.connect(
                    host="127.0.0.1", port=port, user="weightlens", password=password, dbname="postgres"
                )
                break
            except psycopg2.OperationalError:  # still starting up
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db_name}"')
        con.close()
        yield Postgres("127.0.0.1", port, "weightlens", password, db_name, data, log)
    finally:
        stop(proc, signal.SIGINT)  # "fast" shutdown
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Redis:
    port: int
    log: Path

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextlib.contextmanager
def redis(parent: Path) -> Iterator[Redis]:
    """A Redis server on 127.0.0.1:<free port>, no persistence, files in a temporary dir. Removed on exit."""
    server = shutil.which("redis-server")
    if server is None:
        raise ClusterSetupError("redis-server not found (ensure_debian_packages first)")
    base = _service_dir(parent, "redis", None)
    port, log = free_port(), base / "redis.log"
    proc = subprocess.Popen(
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(base),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd=base,
    )
    try:
        log.touch()
        wait_for_port(port, proc, log)
        yield Redis(port, log)
    finally:
        stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def init_instance(env: dict[str, str]) -> None:
    """Create (or migrate) the instance's schema in PostgreSQL once, before several processes open it:
    processes creating a fresh schema at the same moment collide (``type "snapshots" already exists``)."""
    _run([sys.executable, "-m", "dagster", "instance", "migrate"], "dagster instance migrate", env=env)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    node: str = field(default="")  # celery's node name, name@host

    def ready(self) -> bool:
        return self.log.exists() and f"{self.node} ready." in self.log.read_text(errors="replace")


@contextlib.contextmanager
def celery_workers(
    count: int, config_yaml: Path, env: dict[str, str], log_dir: Path, prefix: str = "wl", timeout: float = 180
) -> Iterator[list[Worker]]:
    """``count`` Celery workers started with dagster-celery's CLI (``dagster-celery worker start -A
    dagster_celery.app -y config_yaml``), one step at a time each (solo pool), logs in ``log_dir``. Waits
    until each reports ready. Each runs in its own process group (the CLI starts ``celery`` as a child)."""
    cli = Path(sys.executable).parent / "dagster-celery"
    if not cli.exists():
        raise ClusterSetupError(f"{cli} not found (the cluster extra is not installed in this environment)")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"}
    host = socket.gethostname()
    workers: list[Worker] = []
    try:
        for i in range(1, count + 1):
            name = f"{prefix}{i}"
            log = log_dir / f"{name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [
                        str(cli),
                        "worker",
                        "start",
                        "-A",
                        "dagster_celery.app",
                        "-y",
                        str(config_yaml),
                        "-n",
                        name,
                        "-q",
                        "dagster",
                        "--loglevel",
                        "INFO",
                        "--",
                        "--pool=solo",
                        "--without-gossip",
                        "--without-mingle",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
            workers.append(Worker(name, proc, log, node=f"{name}@{host}"))
        deadline = time.monotonic() + timeout
        while not all(w.ready() for w in workers):
            for w in workers:
                if w.proc.poll() is not None:
                    raise ClusterSetupError(f"worker {w.name} exited {w.proc.returncode}:\n{w.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                late = [w.name for w in workers if not w.ready()]
                raise ClusterSetupError(f"workers {late} not ready after {timeout:.0f} s; logs in {log_dir}")
            time.sleep(0.5)
        yield workers
    finally:
        for w in workers:
            stop(w.proc, signal.SIGTERM, group=True)


# --- command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/local_cluster.py")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL, Redis and Celery workers on 127.0.0.1 until Ctrl-C")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--dir", default=None, help="where DAGSTER_HOME and logs go (default: a new temp dir)")
    sub.add_parser("install", help="install what the cluster needs (apt: postgresql, redis-server; pip: .[cluster])")
    args = parser.parse_args(argv)
    if args.command == "install":
        installed = ensure_debian_packages()
        extra = ensure_cluster_extra()
        print(
            f"cluster prerequisites present (installed: {', '.join(installed) or 'no packages'}"
            f"{', the cluster extra' if extra else ''})"
        )
        return

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C, and also SIGTERM or SIGINT to a backgrounded `up` (a non-interactive shell ignores SIGINT for
    # background jobs): either unwinds the context managers, which stop every process started here.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    ensure_debian_packages()
    ensure_cluster_extra()
    base = Path(args.dir or tempfile.mkdtemp(prefix="weightlens-cluster-")).resolve()
    home = base / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "deploy" / "celery" / "dagster.yaml", home / "dagster.yaml")
    with postgres(Path(tempfile.gettempdir())) as pg, redis(Path(tempfile.gettempdir())) as rd:
        env = {
            **os.environ,
            **pg.env(),
            "DAGSTER_HOME": str(home),
            "WEIGHTLENS_CELERY_BROKER": rd.url(0),
            "WEIGHTLENS_CELERY_BACKEND": rd.url(1),
        }
        init_instance(env)
        with celery_workers(args.workers, ROOT / "deploy" / "celery" / "worker.yaml", env, base / "worker-logs"):
            print("# cluster up; in another shell:")
            for key in ("DAGSTER_HOME", *pg.env(), "WEIGHTLENS_CELERY_BROKER", "WEIGHTLENS_CELERY_BACKEND"):
                print(f"export {key}={env[key]}")
            print(
                "python -m orchestration.cluster materialize   "
                "# the planted releases; -c deploy/celery/resources.yaml for yours"
            )
            print(f"# worker logs: {base / 'worker-logs'}; Ctrl-C stops everything", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
