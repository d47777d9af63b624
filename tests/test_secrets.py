"""Secrets are never printed (issue 11, part 6): not in a config error, a CLI error, a log
line of ``prepaid serve`` or ``--json``.

Every bad config this suite and tests/test_config.py / tests/test_bad_input.py know is run
through the real ``prepaid`` command (a subprocess: every byte of stdout and stderr, logs
included), with known secrets in every place a secret can be, and the output is searched
for each secret raw, URL-encoded and in pieces (a half-masked password shows a piece).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from click.testing import CliRunner

from prepaid.config import load
from prepaid.errors import ConfigError, InputError, StoreUnavailable
from prepaid.redis_client import connect, mask_url
from shell.cli import main
from testbed.ami_peer import AmiPeer
from testbed.servers import RedisServer, free_port

PREPAID = str(Path(sys.executable).parent / "prepaid")

# Each secret is made of pieces no output would hold by chance, joined by the characters
# that broke the masking: '@' and '/' (and ':' '?' '#' '%' '+' that URLs treat specially).
REDIS_PW = "Rq7Tzvx@Lk2Wmxq/Hp9Nsdw:Vb4Gtyr"
AMI = "Am5Kcqz8Ztrw"
AGI = "Ag4Lmxr7Pqwv"
SMTP = "Sm3Jvbn6Ynqp?Wd2Xcfg#Ye8"
STRIPE = "sk_test_St8Hfwk2Dkrm"
NUMERIC = "8837261945"
USER_PW = "Us6Frtg%2Fp+Lo9Qazx"
SECRETS = (REDIS_PW, AMI, AGI, SMTP, STRIPE, NUMERIC, USER_PW)


def forms(secret: str) -> set[str]:
    """Every way a secret could be shown: raw, URL-encoded, and each piece of it."""
    out = {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}
    out |= {p for p in re.split(r"[^A-Za-z0-9]+", secret) if len(p) >= 6}
    return out


def leaks(text: str) -> list[str]:
    return sorted(f for s in SECRETS for f in forms(s) if f in text)


def enc(secret: str) -> str:
    return quote(secret, safe="")


# -- the one masking function ---------------------------------------------------------

@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{REDIS_PW}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"redis://:{enc(REDIS_PW)}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"redis://admin:{REDIS_PW}@db.example:6379/2", "redis://admin:***@db.example:6379/2"),
    (f"rediss://:p@ss@h:1/0?password={enc(USER_PW)}&ssl_cert_reqs=none",
     "rediss://:***@h:1/0?password=***&ssl_cert_reqs=none"),
    (f"redis://127.0.0.1:6379/0?password={USER_PW}", "redis://127.0.0.1:6379/0?password=***"),
    (f"redis://h:1/0?db=1&Password={AMI}#{AGI}", "redis://h:1/0?db=1&Password=***#***"),
    (f"redis://{AMI}@h:1/0", "redis://***@h:1/0"),  # a lone userinfo: a password to redis-py
    (f"unix://:{REDIS_PW}@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    (f"redis+sentinel://:{REDIS_PW}@s1:26379,s2:26379", "redis+sentinel://:***@s1:26379,s2:26379"),
    (f"redis+sentinel://:{REDIS_PW}@s1:26379/mymaster/0",
     "redis+sentinel://:***@s1:26379/mymaster/0"),
    (f"redis+cluster://u:{REDIS_PW}@n1:7000,n2:7001", "redis+cluster://u:***@n1:7000,n2:7001"),
    (f"redis:/:{REDIS_PW}@h:1/0", "***@h:1/0"),  # not a URL at all: nothing before the @
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_mask_url_hides_every_form_of_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert not leaks(mask_url(url))


@pytest.mark.parametrize("password", [REDIS_PW, "p@ss", "pa/ss", "a:b", "x?y#z"])
async def test_a_raw_at_or_slash_in_a_password_still_connects(password: str) -> None:
    server = RedisServer(password=password)
    server.start()
    try:
        for url in (f"redis://:{password}@127.0.0.1:{server.port}/0",
                    f"redis://:{enc(password)}@127.0.0.1:{server.port}/0",
                    f"redis://default:{password}@127.0.0.1:{server.port}/0",
                    f"redis://127.0.0.1:{server.port}/0?password={enc(password)}"):
            client = connect(url)
            try:
                assert await client.ping(), url
            finally:
                await client.aclose()
    finally:
        server.cleanup()


def test_a_url_redis_cannot_parse_is_one_masked_error() -> None:
    with pytest.raises(InputError) as err:
        connect(f"redis://:{REDIS_PW}@127.0.0.1:notaport/0")
    assert not leaks(str(err.value)) and "127.0.0.1" in str(err.value)


# -- the config file ----------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"redis://127.0.0.1:6379/0?password={enc(REDIS_PW)}",
    f"redis://:{REDIS_PW}@127.0.0.1:6379/0",
    f"redis://{AMI}@127.0.0.1:6379/0",
    f"redis+sentinel://:{enc(REDIS_PW)}@127.0.0.1:26379/mymaster",
])
def test_a_world_readable_file_with_a_password_in_any_form_is_refused(tmp_path: Path,
                                                                      url: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(f"[redis]\nurl = {json.dumps(url)}\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load(f, env={})
    assert "[redis] url" in str(err.value) and "readable by every user" in str(err.value)
    assert not leaks(str(err.value))
    f.chmod(0o640)
    assert load(f, env={}).redis.url == url


@pytest.mark.parametrize("mode", [0o666, 0o602, 0o622])
def test_a_world_writable_file_is_refused_with_one_line(tmp_path: Path, mode: int) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[billing]\ncurrency = 'EUR'\n")  # no secret at all: still refused
    f.chmod(mode)
    with pytest.raises(ConfigError) as err:
        load(f, env={})
    assert str(err.value) == (f"{f}: is writable by every user, so anyone on this host can "
                              f"change what it says; run 'chmod o-w {f}'")
    f.chmod(mode & ~stat.S_IWOTH)
    assert load(f, env={}).billing.currency == "EUR"


def test_no_settings_repr_shows_a_secret() -> None:
    s = load(None, env={"PREPAID_REDIS_URL": f"redis://:{enc(REDIS_PW)}@h:1/0",
                        "PREPAID_AMI_SECRET": AMI, "PREPAID_AGI_SECRET": AGI,
                        "PREPAID_SMTP_PASSWORD": SMTP, "STRIPE_API_KEY": STRIPE})
    assert not leaks(repr(s))


# -- every bad config, through the real command ----------------------------------------

def _toml(**sections: str) -> str:
    return "".join(f"[{name}]\n{body}\n" for name, body in sections.items())


ALL_SECRETS = (f"[ami]\nsecret = {json.dumps(AMI)}\n[agi]\nsecret = {json.dumps(AGI)}\n"
               f"[smtp]\npassword = {json.dumps(SMTP)}\n"
               f"[payments]\nstripe_api_key = {json.dumps(STRIPE)}\n")
DEAD = "127.0.0.1:1"  # nothing listens there


def _url(url: str) -> str:
    return f"[redis]\nurl = {json.dumps(url)}\n"


# (name, file text, file mode, environment): each is refused, or cannot reach Redis.
CASES: list[tuple[str, str, int, dict[str, str]]] = [
    ("numeric ami secret", f"[ami]\nsecret = {NUMERIC}\n", 0o600, {}),
    ("numeric agi secret", f"[agi]\nsecret = {NUMERIC}\n", 0o600, {}),
    ("numeric smtp password", f"[smtp]\npassword = {NUMERIC}\n", 0o600, {}),
    ("numeric stripe key", f"[payments]\nstripe_api_key = {NUMERIC}\n", 0o600, {}),
    ("numeric redis url", f"[redis]\nurl = {NUMERIC}\n", 0o600, {}),
    ("list ami secret", f"[ami]\nsecret = [{json.dumps(AMI)}]\n", 0o600, {}),
    ("table smtp password", f"[smtp]\npassword = {{ x = {json.dumps(SMTP)} }}\n", 0o600, {}),
    ("unquoted secret", f"[ami]\nsecret = {AMI}\n", 0o600, {}),
    ("unterminated secret", f"[ami]\nsecret = \"{AMI}\n", 0o600, {}),
    ("misspelt secret key", f"[ami]\nsecert = {json.dumps(AMI)}\n", 0o600, {}),
    ("secret in unknown section", f"[amii]\nsecret = {json.dumps(AMI)}\n", 0o600, {}),
    ("sentinel without service", _url(f"redis+sentinel://:{REDIS_PW}@127.0.0.1:26379"),
     0o600, {}),
    ("sentinel without service, encoded",
     _url(f"redis+sentinel://:{enc(REDIS_PW)}@127.0.0.1:26379/"), 0o600, {}),
    ("sentinel bad address", _url(f"redis+sentinel://:{REDIS_PW}@nohost/mymaster"), 0o600, {}),
    ("cluster with a db", _url(f"redis+cluster://:{REDIS_PW}@127.0.0.1:7000/3"), 0o600, {}),
    ("cluster bad address", _url(f"redis+cluster://u:{REDIS_PW}@127.0.0.1:x"), 0o600, {}),
    ("not a redis scheme", _url(f"http://:{REDIS_PW}@127.0.0.1:6379"), 0o600, {}),
    ("one slash", _url(f"redis:/:{REDIS_PW}@127.0.0.1:6379/0"), 0o600, {}),
    ("bad port", _url(f"redis://:{REDIS_PW}@127.0.0.1:notaport/0"), 0o600, {}),
    ("raw @ and /, dead redis", _url(f"redis://:{REDIS_PW}@{DEAD}/0"), 0o600, {}),
    ("user and password, dead redis", _url(f"redis://admin:{REDIS_PW}@{DEAD}/0"), 0o600, {}),
    ("encoded password, dead redis", _url(f"redis://:{enc(REDIS_PW)}@{DEAD}/0"), 0o600, {}),
    ("query password, dead redis", _url(f"redis://{DEAD}/0?password={enc(USER_PW)}"),
     0o600, {}),
    ("query password raw, dead redis", _url(f"redis://{DEAD}/0?password={USER_PW}"),
     0o600, {}),
    ("unix socket password, dead redis", _url(f"unix://:{REDIS_PW}@/nonexistent/redis.sock"),
     0o600, {}),
    ("world-readable, every secret", ALL_SECRETS, 0o644, {}),
    ("world-readable, query password", _url(f"redis://{DEAD}/0?password={enc(USER_PW)}"),
     0o644, {}),
    ("world-readable, slash password", _url(f"redis://:{REDIS_PW}@{DEAD}/0"), 0o644, {}),
    ("world-writable, every secret", ALL_SECRETS, 0o666, {}),
    ("every secret and a bad key", ALL_SECRETS + "[billing]\ncurrency = 'euro'\n", 0o600, {}),
    ("every secret and a bad allow", ALL_SECRETS.replace(
        "[agi]\n", "[agi]\nallow = ['10.0.0.0/33']\n"), 0o600, {}),
    ("every secret and bad [smtp] from", ALL_SECRETS.replace(
        "[smtp]\n", "[smtp]\nfrom = 'a@b.org\\nBcc: x@y'\n"), 0o600, {}),
    ("every secret, dead redis", ALL_SECRETS + _url(f"redis://:{REDIS_PW}@{DEAD}/0"),
     0o600, {}),
    ("env url without service", "", 0o600,
     {"PREPAID_REDIS_URL": f"redis+sentinel://:{REDIS_PW}@127.0.0.1:26379"}),
    ("env url bad scheme", "", 0o600, {"PREPAID_REDIS_URL": f"redis:/{REDIS_PW}@h"}),
    ("env secrets, dead redis", "[billing]\ncurrency = 'euro'\n", 0o600, {
        "PREPAID_REDIS_URL": f"redis://:{REDIS_PW}@{DEAD}/0?password={enc(USER_PW)}",
        "PREPAID_AMI_SECRET": AMI, "PREPAID_AGI_SECRET": AGI,
        "PREPAID_SMTP_PASSWORD": SMTP, "STRIPE_API_KEY": STRIPE}),
]
COMMANDS = (("balance", "1001"), ("status", "--json"), ("status",), ("account", "list", "--json"),
            ("topup", "1001", "5", "--reference", "r-1"), ("rates", "lookup", "+3531"))


def _conf(tmp_path: Path, text: str, mode: int) -> Path:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(text)
    conf.chmod(mode)
    return conf


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREPAID_", "STRIPE_"))}
    return {**full, **env}


def _run(conf: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PREPAID, "--config", str(conf), *args], capture_output=True,
                          env=_clean_env(env), stdin=subprocess.DEVNULL, timeout=60)


def _one_error_line(stderr: str) -> bool:
    lines = [x for x in stderr.splitlines() if x.strip()]
    return len(lines) == 1 and lines[0].startswith("prepaid: error: ")


@pytest.mark.parametrize(("name", "text", "mode", "env"), CASES, ids=[c[0] for c in CASES])
def test_no_bad_config_prints_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture, name: str, text: str,
                                       mode: int, env: dict[str, str]) -> None:
    """Every command that reads the config, in-process (its logs captured too)."""
    conf = _conf(tmp_path, text, mode)
    for var in [v for v in os.environ if v.startswith(("PREPAID_", "STRIPE_"))]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    caplog.set_level(logging.DEBUG)
    for args in COMMANDS:
        caplog.clear()
        res = CliRunner().invoke(main, ["--config", str(conf), *args])
        out = res.stdout + res.stderr + caplog.text
        if res.exc_info is not None and not isinstance(res.exception, SystemExit):
            out += "".join(traceback.format_exception(*res.exc_info))
        assert not leaks(out), f"{args}: {out}"
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), f"{args}: {out}"
        assert (args[0] == "status" and not res.stderr) or _one_error_line(res.stderr), (
            f"{args}: {out}")


def test_serve_refuses_every_bad_config_with_one_line_and_no_secret(tmp_path: Path) -> None:
    """``prepaid serve``, the real command, for each case it must refuse (four at a time)."""
    def serve(i: int, text: str, mode: int, env: dict[str, str]) -> tuple[int, str]:
        (tmp_path / str(i)).mkdir()
        conf = _conf(tmp_path / str(i), text, mode)
        res = subprocess.run([PREPAID, "--config", str(conf), "serve"], capture_output=True,
                             env=_clean_env(env), stdin=subprocess.DEVNULL, timeout=60)
        return res.returncode, res.stdout.decode(errors="replace") + res.stderr.decode(
            errors="replace")

    refused = [(i, c) for i, c in enumerate(CASES) if "dead redis" not in c[0]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ic: serve(ic[0], *ic[1][1:]), refused))
    for (_, (name, *_)), (code, out) in zip(refused, results, strict=True):
        assert not leaks(out), f"{name}: {out}"
        assert code == 1 and _one_error_line(out), f"{name}: {out}"


# -- prepaid serve, running: its log and status ------------------------------------------

@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=REDIS_PW)
    server.start()
    yield server
    server.cleanup()


def _spawn(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([PREPAID, "--config", str(conf), "serve", "--log-level", "DEBUG"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes],
                    within: float = 30.0) -> str:
    deadline = time.monotonic() + within
    while True:
        text = _read(path)
        if re.search(pattern, text):
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log of serve:\n{text}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["userinfo raw", "userinfo encoded", "query", "wrong password"])
async def test_serve_and_status_show_no_secret(tmp_path: Path, locked_redis: RedisServer,
                                               how: str) -> None:
    port = locked_redis.port
    url = {"userinfo raw": f"redis://:{REDIS_PW}@127.0.0.1:{port}/0",
           "userinfo encoded": f"redis://default:{enc(REDIS_PW)}@127.0.0.1:{port}/0",
           "query": f"redis://127.0.0.1:{port}/0?password={enc(REDIS_PW)}",
           "wrong password": f"redis://:{USER_PW}@127.0.0.1:{port}/0"}[how]
    ami = AmiPeer(secret="not-ours")  # refuses the login made with [ami] secret
    await ami.start()
    conf = tmp_path / "prepaid.toml"
    conf.write_text(ALL_SECRETS.replace("[agi]\n", f"[agi]\nlisten = '127.0.0.1:{free_port()}'\n")
                    .replace("[ami]\n", f"[ami]\nport = {ami.port}\n"
                             "reconnect_max_seconds = 1.0\n") + _url(url))
    conf.chmod(0o600)
    log = tmp_path / "serve.log"
    proc = _spawn(conf, log)
    try:
        # Up, every service started, the AMI login refused and the Redis state logged.
        await _wait_for(log, r"serving agi, ami, policy", proc)
        await _wait_for(log, r"(?s)service agi started.*service ami started.*service policy "
                        "started", proc)
        await _wait_for(log, r"AMI login as 'prepaid' at .* refused", proc)
        if how == "wrong password":
            await _wait_for(log, r"unavailable", proc)
        status = await asyncio.to_thread(_run, conf, {}, "status", "--json")
        plain = await asyncio.to_thread(_run, conf, {}, "status")
        balance = await asyncio.to_thread(_run, conf, {}, "balance", "1001")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        await ami.stop()
    assert ami.logins == 0
    text = _read(log)
    for res in (status, plain, balance):
        text += res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    assert f"127.0.0.1:{port}" in text
    assert not leaks(text), text
    if how != "wrong password":
        assert json.loads(status.stdout)["redis"]["state"] == "up"


async def test_the_ledger_names_its_redis_without_the_password() -> None:
    from prepaid.ledger import Ledger

    client = connect(f"redis://:{enc(REDIS_PW)}@{DEAD}/0", timeout=0.5)
    try:
        ledger = Ledger(client, url=f"redis://:{REDIS_PW}@{DEAD}/0")  # given raw by a caller
        with pytest.raises(StoreUnavailable) as err:
            await ledger.get("1001")
        assert f"Redis at redis://:***@{DEAD}/0 is unavailable" in str(err.value)
        assert not leaks(str(err.value))
    finally:
        await client.aclose()
