"""The distribution outside the source tree: build the wheel (from the checkout and from the
sdist), install it into a fresh venv in a temporary folder, and run the CLI from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import wave
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.servers import RedisServer, toml_text

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def prompt_names() -> set[str]:
    lines = (REPO / "sounds" / "prompts.txt").read_text().splitlines()
    return {ln.split("|", 1)[0] for ln in lines if ln and not ln.startswith("#")}


@dataclass
class Installed:
    venv: Path
    wheel: Path
    home: Path  # an empty working folder outside the checkout
    env: dict[str, str]

    def prepaid(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([str(self.venv / "bin" / "prepaid"), *args], cwd=self.home, env=self.env,
                   timeout=60)


# Not copied for a build: setuptools never empties an in-tree build/, so a wheel built in a
# checkout still carries modules that were moved away since (seen: prepaid/cli.py).
BUILD_LEFTOVERS = shutil.ignore_patterns("build", ".git", ".venv*", "*.egg-info", "__pycache__",
                                         ".*_cache", ".hypothesis")


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` of a clean copy of ``source`` (the working tree as it is, without build
    output). No build isolation: setuptools comes from the test venv (the lock pins it), so
    the build downloads nothing."""
    tree = out / "src"
    shutil.copytree(source, tree, ignore=BUILD_LEFTOVERS)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(tree)], cwd=tree)
    (wheel,) = out.glob("asterisk_prepaid-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(REPO, tmp / "dist")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PREPAID_CONFIG")
           and not k.startswith("PREPAID_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # The dependencies come from the configured package index, as for a user's install.
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=home, env=env)
    yield Installed(venv, wheel, home, env)


def test_the_installed_copy_is_imported_not_the_checkout(installed: Installed) -> None:
    code = "import agi, agi.sounds, prepaid, policy, ami_listener; print(agi.__file__)"
    out = run([str(installed.venv / "bin" / "python"), "-c", code], cwd=installed.home,
              env=installed.env).stdout
    path = Path(out.strip()).resolve()
    assert path.is_relative_to(installed.venv.resolve()), path
    assert not path.is_relative_to(REPO), path


def test_prepaid_help_lists_the_commands(installed: Installed) -> None:
    out = installed.prepaid("--help").stdout
    for command in ("account", "balance", "topup", "rates", "serve", "sounds", "status"):
        assert f"  {command} " in out, out


def test_sounds_install_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    target = tmp_path / "sounds-en"
    out = installed.prepaid("sounds", "install", "--dir", str(target)).stdout
    names = prompt_names()
    assert f"installed {len(names)} prompts" in out, out
    got = {p.name for p in (target / "prepaid").iterdir()}
    assert got == {f"{n}.{ext}" for n in names for ext in ("wav", "ulaw")}
    for name in names:
        with wave.open(str(target / "prepaid" / f"{name}.wav")) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2), name
        assert (target / "prepaid" / f"{name}.ulaw").read_bytes() == (
            REPO / "sounds" / f"{name}.ulaw").read_bytes()


def test_a_ledger_command_against_redis(installed: Installed, redis_server: RedisServer,
                                        tmp_path: Path) -> None:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    config = tmp_path / "prepaid.toml"
    config.write_text(toml_text({"redis": {"url": redis_server.url},
                                 "billing": {"currency": "EUR"}}))
    installed.prepaid("--config", str(config), "account", "create", "4711")
    installed.prepaid("--config", str(config), "topup", "4711", "12.34", "--reference", "w1")
    out = installed.prepaid("--config", str(config), "balance", "4711").stdout
    assert "12.34" in out, out


def test_the_sdist_builds_the_same_wheel(installed: Installed, tmp_path: Path) -> None:
    # What a build from the sdist (pip install of the .tar.gz, a distribution package) ships.
    run([sys.executable, "-c", "from setuptools import build_meta as b; "
         f"b.build_sdist({str(tmp_path / 'sdist')!r})"], cwd=REPO)
    (sdist,) = (tmp_path / "sdist").glob("asterisk_prepaid-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    wheel = build_wheel(source, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(installed.wheel) as b:
        from_sdist = {n for n in a.namelist() if ".dist-info/" not in n}
        from_tree = {n for n in b.namelist() if ".dist-info/" not in n}
    assert from_sdist == from_tree
    assert {f"agi/sounds/{n}.wav" for n in prompt_names()} <= from_sdist
    assert "prepaid/ledger.lua" in from_sdist and "policy/templates/low_balance.txt" in from_sdist
    assert {"policy/web/templates/account.html", "policy/web/templates/app.css"} <= from_sdist
