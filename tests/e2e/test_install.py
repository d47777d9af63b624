"""scripts/install.sh on a PBX host: run inside a copy of the test bed's Debian root (Asterisk
22, its own python3 without python3-venv, no package index), then a call placed through the
installed copy: `prepaid serve` from /opt/asterisk-prepaid as the service user, with the
config and the prompts where the script put them.

Two ways in: offline, where nothing is downloaded inside the root (the wheel and its
dependencies for the root's Python are downloaded on the host into a wheelhouse that the
script installs from, --wheelhouse), and online, where the script gets python3-venv from the
root's own apt sources and the dependencies from the package index. Each copy is deleted
afterwards; the shared root is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prepaid.config import parse
from prepaid.store import open_store
from testbed.ami import Ami
from testbed.pbx import Pbx, free_port
from testbed.servers import toml_text
from testbed.smtp_sink import SmtpSink
from tests.e2e.test_system_e2e import DECK, EUR, System, config_for, rate_for, until
from tests.test_wheel import BUILD_LEFTOVERS, REPO, build_wheel, prompt_names

pytestmark = pytest.mark.pbx

INNER = "/tmp/prepaid-install"  # the script, asterisk-conf/ and the wheelhouse, in the root
VENV = "/opt/asterisk-prepaid/.venv"
CONFIG = "/etc/asterisk-prepaid/prepaid.toml"
SOUNDS = "/usr/share/asterisk/sounds/en/prepaid"
UNIT = "/etc/systemd/system/asterisk-prepaid.service"
USER = "asterisk-prepaid"
TEST_TOOLS = ("pytest", "hypothesis", "mypy", "ruff", "aiosmtpd", "asterisklint", "setuptools")


@dataclass
class Host:
    """The copied root after scripts/install.sh ran in it once."""

    root: Path
    pbx: Pbx  # not started: its chroot_command runs things in the copy
    wheel: str
    first_output: str

    def run(self, *argv: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.pbx.chroot_command(list(argv)), capture_output=True,
                              text=True, timeout=300, env={**self.pbx._env(), **(env or {})},
                              check=False)
        if check:
            assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n" \
                                         f"{proc.stderr}"
        return proc

    def install(self, *, from_checkout: bool = False) -> subprocess.CompletedProcess[str]:
        wheel = () if from_checkout else ("--wheel", self.wheel)
        return self.run("/bin/bash", f"{INNER}/scripts/install.sh", *wheel,
                        "--wheelhouse", f"{INNER}/wheelhouse")


def wheelhouse(wheel: Path, out: Path, python: str) -> None:
    """The wheel, its dependencies, pip and setuptools (to build the checkout), as wheels for
    the root's CPython ``python`` (e.g. "314") on x86-64 Linux."""
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64", "linux_x86_64") for x in ("--platform", p)]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(out), "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", "--abi", f"cp{python}",
         *platforms, str(wheel), "pip", "setuptools>=77"], capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def copy_of(pbx_root: Path) -> Iterator[tuple[Path, Pbx]]:
    """A throw-away copy of the test bed's root with the checkout in INNER, deleted after."""
    base = Path(tempfile.mkdtemp(prefix="prepaid-install-", dir="/var/tmp"))
    try:
        root = base / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(pbx_root), str(root)], check=True,
                       timeout=600)
        # Other runs copied the checkout's prompts here; the call must use the installed ones.
        shutil.rmtree(root / "usr/share/asterisk/sounds/prepaid", ignore_errors=True)
        shutil.copytree(REPO, root / INNER.lstrip("/"), ignore=BUILD_LEFTOVERS)
        yield root, Pbx(root, project_sounds=None)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(REPO, tmp_path_factory.mktemp("install-dist"))


@pytest.fixture(scope="module")
def host(pbx_root: Path, wheel_file: Path) -> Iterator[Host]:
    with copy_of(pbx_root) as (root, pbx):
        h = Host(root, pbx, f"{INNER}/wheelhouse/{wheel_file.name}", "")
        version = "import sys; print('%d%d' % sys.version_info[:2])"
        wheelhouse(wheel_file, root / INNER.lstrip("/") / "wheelhouse",
                   h.run("python3", "-c", version).stdout.strip())
        h.first_output = h.install().stdout
        yield h


def test_install_lays_out_the_runtime(host: Host) -> None:
    out = host.first_output
    assert f"added the system user {USER}" in out, out
    assert "not enabled" in out, out  # no systemd in the chroot
    pw = host.run("getent", "passwd", USER).stdout.strip().split(":")
    assert int(pw[2]) < 1000 and pw[6] == "/usr/sbin/nologin", pw
    assert USER in host.run("id", "-nG", USER).stdout.split()
    assert "asterisk" in host.run("id", "-nG", USER).stdout.split()  # reads the CDR file
    assert host.run("stat", "-c", "%a %U:%G", CONFIG).stdout.split() == ["640", f"root:{USER}"]
    assert (host.root / CONFIG.lstrip("/")).read_bytes() == (
        REPO / "asterisk-conf" / "prepaid.toml").read_bytes()
    assert (host.root / UNIT.lstrip("/")).read_bytes() == (
        REPO / "asterisk-conf" / "asterisk-prepaid.service").read_bytes()
    assert not (host.root / "etc/systemd/system/multi-user.target.wants" / UNIT.split("/")[-1]
                ).exists()
    # The app without the test extras.
    pkgs = host.run(f"{VENV}/bin/python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "asterisk-prepaid==" in pkgs and "redis==" in pkgs, pkgs
    assert not [t for t in TEST_TOOLS if f"{t}==" in pkgs], pkgs
    # The prompts, as Asterisk resolves sounds/en (a symlink into /etc/alternatives).
    sums = host.run("sh", "-c", f"cd {SOUNDS} && sha256sum *").stdout.splitlines()
    got = {name: digest for digest, name in (line.split() for line in sums)}
    want = {f"{n}.{ext}": hashlib.sha256((REPO / "sounds" / f"{n}.{ext}").read_bytes())
            .hexdigest() for n in prompt_names() for ext in ("wav", "ulaw")}
    assert got == want


def test_install_again_from_the_checkout_keeps_the_config(host: Host) -> None:
    config = host.root / CONFIG.lstrip("/")
    text = config.read_text() + "# the admin's edit\n"
    config.write_text(text)
    out = host.install(from_checkout=True).stdout  # the wheel built from the checkout copy
    assert f"kept {CONFIG}" in out and "added the system user" not in out, out
    assert "prepaid, version 0.1.0" in out, out
    assert config.read_text() == text
    assert host.run("stat", "-c", "%a %U:%G", CONFIG).stdout.split() == ["640", f"root:{USER}"]


def start_serve(pbx: Pbx, log: Path) -> subprocess.Popen[bytes]:
    """The installed `prepaid serve` as the unit runs it: the service user, PREPAID_CONFIG."""
    with log.open("wb") as out:
        return subprocess.Popen(
            pbx.chroot_command(["/usr/sbin/runuser", "-u", USER, "--", "/usr/bin/env",
                                f"PREPAID_CONFIG={CONFIG}", f"{VENV}/bin/prepaid", "serve"]),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=pbx._env(), start_new_session=True)


def test_install_with_apt_and_the_package_index(pbx_root: Path, wheel_file: Path) -> None:
    """Without a wheelhouse: python3-venv (which the root lacks) from the root's own apt
    sources, the dependencies from the default package index."""
    with copy_of(pbx_root) as (root, pbx):
        shutil.copy2(wheel_file, root / INNER.lstrip("/"))
        h = Host(root, pbx, f"{INNER}/{wheel_file.name}", "")
        assert h.run("python3", "-c", "import ensurepip", check=False).returncode != 0
        if h.run("apt-get", "update", "-qq", check=False).returncode != 0:
            pytest.skip("the root's apt sources cannot be reached from here")
        # pip in the root trusts what pip on this host trusts (a site CA, if it has one).
        env = {}
        host_ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
        if Path(host_ca).is_file():
            shutil.copy2(host_ca, root / INNER.lstrip("/") / "ca.pem")
            env["PIP_CERT"] = f"{INNER}/ca.pem"
        out = h.run("/bin/bash", f"{INNER}/scripts/install.sh", "--wheel", h.wheel,
                    env=env).stdout
        assert "installing python3-venv" in out and "prepaid, version 0.1.0" in out, out
        h.run("python3", "-c", "import ensurepip")
        assert "  sounds " in h.run(f"{VENV}/bin/prepaid", "--help").stdout


@pytest.fixture
async def system(host: Host, redis_url: str, tmp_path: Path,
                 caplog: pytest.LogCaptureFixture) -> AsyncIterator[System]:
    """An Asterisk in the copied root and the installed `prepaid serve`, run by the service
    user with the config the script installed (the admin's edit: this test bed's ports)."""
    agi_port = free_port(socket.SOCK_STREAM)
    pbx = Pbx(host.root, agi_port=agi_port, project_sounds=None)
    pbx.start()
    smtp = SmtpSink(tmp_path / "mail").start()
    serve: subprocess.Popen[bytes] | None = None
    store = None
    ami = None
    try:
        data = config_for(redis_url, pbx, agi_port, smtp.port)
        data["ami"]["cdr_file"] = f"{pbx.run_dir_inner}/log/cdr-custom/prepaid.csv"
        config = host.root / CONFIG.lstrip("/")
        config.write_text(toml_text(data))  # mode and owner stay the script's
        settings = parse(data, "<install e2e>", env={})
        store = await open_store(settings)
        await store.rates.replace(DECK)
        log = tmp_path / "serve.log"
        mark = len(pbx.log_text())
        serve = start_serve(pbx, log)
        user = settings.ami.username
        await asyncio.to_thread(pbx.wait_for_log, f"Manager '{user}' logged on", 30, mark)

        async def agi_up() -> bool:
            assert serve is not None and serve.poll() is None, log.read_text()[-3000:]
            try:
                _, w = await asyncio.open_connection("127.0.0.1", agi_port)
            except OSError:
                return False
            w.close()
            return True

        await until(agi_up, "the installed FastAGI server", 30)
        ami = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
        yield System(pbx, settings, store, ami, smtp, caplog, config)
    finally:
        if serve is not None:  # its own process group: unshare, runuser, serve, children
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(serve.pid, sig)
                    await asyncio.to_thread(serve.wait, 20)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if ami is not None:
            await ami.close()
        if store is not None:
            await store.close()
        smtp.stop()
        pbx.stop()


async def test_a_call_through_the_installed_copy(system: System) -> None:
    await system.account("1001", 10 * EUR)
    number = "00880312345"  # the far end hangs up after 3 s
    call = await system.originate(number, "1001")
    assert await system.status(call.ref) == ("ALLOWED", "")
    await system.answered(call)
    await system.ended(call)
    acct = await system.store.ledger.get("1001")
    assert acct.held == 0
    assert acct.balance == 10 * EUR - await system.check_billed(call, rate_for(number))

    # Refused: the prompt the AGI plays is the one the script installed.
    await system.account("1002", 0)
    mark = len(system.pbx.log_text())
    call = await system.originate(number, "1002")
    assert await system.status(call.ref) == ("DENIED", "NO_CREDIT")
    await asyncio.to_thread(system.pbx.wait_for_log,
                            r"Playing 'prepaid/balance-too-low\.", 10, mark)
    assert not re.search(r"prepaid/balance-too-low.*does not exist",
                         system.pbx.log_text()[mark:])
