"""A real Asterisk 22 test bed: a Debian unstable root folder and Asterisk chrooted into it.

Debian 12 has no Asterisk; Debian unstable has Asterisk 22 and SIPp. `ensure_rootfs()` builds
an unstable root folder with mmdebstrap once and caches it outside the repository.
`Pbx` writes a per-run configuration into that root (made from the project's `asterisk-conf/`
plus the test-bed templates in `testbed/pbx_conf/`) and runs Asterisk chrooted into it, in a
private mount namespace with /proc and /dev mounted, on free ports on 127.0.0.1. Asterisk shares
the host's loopback, so a FastAGI server, an AMI client or SIPp on the host reach it on 127.0.0.1.

    with Pbx(agi_port=4573) as pbx:
        pbx.cli("core show channels")
        ...  # AMI on 127.0.0.1:pbx.ami_port as pbx.ami_username / pbx.ami_secret

Two trunk modes. `trunk="local"` (the default): the project's Dial goes to a Local channel
into the test-bed dialplan ([testbed-trunk] in testbed/pbx_conf/extensions.conf). `trunk="sip"`:
the shipped `Dial(PJSIP/<number>@my-trunk)` is used unchanged and `my-trunk` is a PJSIP
endpoint whose contact is a far-end SIPp on 127.0.0.1:pbx.farend_port (testbed/sipload.py
starts it); callers are PJSIP endpoints named by their account (`sip_accounts`), found by
the From user name, each with `accountcode = <account>`. Asterisk's own CDRs are in
`pbx.cdrs()` (cdr_csv's Master.csv).

The mirror is read from the machine's apt sources at run time.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
CONF_TEMPLATES = Path(__file__).resolve().parent / "pbx_conf"
PROJECT_CONF = REPO / "asterisk-conf"
PROJECT_SOUNDS = REPO / "sounds"

DEFAULT_ROOT = Path("/var/cache/asterisk-prepaid/pbx-root")
SUITE = "unstable"
PACKAGES = ("asterisk", "sip-tester", "asterisk-core-sounds-en", "procps")
STAMP_NAME = ".prepaid-pbx-stamp.json"
STAMP_VERSION = 1

# Inside the root (paths as Asterisk sees them after chroot).
ASTERISK_BIN = "/usr/sbin/asterisk"
SOUNDS_DIR = "/usr/share/asterisk/sounds"
RUNS_DIR = "/var/tmp/prepaid-pbx"

# Config files the test bed owns outright: a project file of that name is ignored.
OWNED_CONFS = frozenset(
    {"asterisk.conf", "modules.conf", "logger.conf", "pjsip.conf", "rtp.conf", "cdr.conf"}
)
# manager.conf [general] keys the test bed must control.
MANAGER_CONTROLLED = frozenset(
    {"enabled", "webenabled", "bindaddr", "port", "tlsenable",
     "tlsbindaddr", "httptimeout"}
)
AGI_URL = re.compile(r"agi://[^/\s,)\"']+")
TRUNKS = ("local", "sip")
# Account ids become PJSIP section names and From user names: keep them plain.
SIP_ACCOUNT = re.compile(r"[A-Za-z0-9_.+-]{1,40}")
# cdr_csv's columns in Asterisk 22 (cdr/cdr_csv.c, build_csv_record) with loguniqueid = yes
# and loguserfield/newcdrcolumns off, as testbed/pbx_conf/cdr.conf sets them; checked against
# a real Master.csv by tests/e2e/test_sip_billing.py.
CDR_CSV_COLUMNS = ("accountcode", "src", "dst", "dcontext", "clid", "channel", "dstchannel",
                   "lastapp", "lastdata", "start", "answer", "end", "duration", "billsec",
                   "disposition", "amaflags", "uniqueid")


class PbxError(RuntimeError):
    """The test bed could not be built or Asterisk did not start/answer."""


@dataclass(frozen=True)
class Cdr:
    """One row of cdr_csv's Master.csv: Asterisk's own record of a call (times in UTC,
    whole seconds; billsec is answer to end, truncated to the second by Asterisk)."""

    uniqueid: str
    accountcode: str
    src: str
    dst: str
    dcontext: str
    clid: str
    channel: str
    dstchannel: str
    lastapp: str
    lastdata: str
    start: str
    answer: str
    end: str
    duration: int
    billsec: int
    disposition: str
    amaflags: str

    @property
    def answered(self) -> bool:
        return self.disposition == "ANSWERED"


# --------------------------------------------------------------------------- root folder


def root_path(path: Path | str | None = None) -> Path:
    """Where the root folder lives: `path`, else $PREPAID_PBX_ROOT, else the default."""
    if path is not None:
        return Path(path)
    env = os.environ.get("PREPAID_PBX_ROOT")
    return Path(env) if env else DEFAULT_ROOT


def _wanted_stamp() -> dict[str, object]:
    return {"version": STAMP_VERSION, "suite": SUITE, "packages": sorted(PACKAGES)}


def _read_stamp(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rootfs_ready(path: Path | str | None = None) -> bool:
    """True when a complete root folder with the wanted packages is cached."""
    root = root_path(path)
    stamp = _read_stamp(root)
    if stamp is None:
        return False
    wanted = _wanted_stamp()
    return all(stamp.get(k) == v for k, v in wanted.items()) and (
        root / ASTERISK_BIN.lstrip("/")
    ).exists()


def _deb822_sources(text: str) -> list[tuple[str, list[str]]]:
    """The (URI, suites) of the enabled deb stanzas of a deb822 ``.sources`` file."""
    out: list[tuple[str, list[str]]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        out += [(uri, suites) for uri in fields.get("uris", "").split()]
    return out


def apt_mirror() -> str:
    """The Debian mirror URI the machine's apt sources name (read, never hard-coded)."""
    candidates: list[tuple[str, list[str]]] = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            candidates += _deb822_sources(src.read_text())
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for src in lists:
        with contextlib.suppress(OSError):
            for line in src.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        # The main archive, not the security one nor a third-party repository.
        if "security" in uri or not re.search(r"/debian/?$", uri):
            continue
        if suites and all(s.endswith(("-security", "/updates")) for s in suites):
            continue
        return uri.rstrip("/")
    raise PbxError("no Debian mirror found in /etc/apt/sources.list{,.d/*.sources}")


def _ensure_mmdebstrap() -> None:
    if shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0:
        raise PbxError("mmdebstrap is not installed and we are not root to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "mmdebstrap"]):
        # apt may be busy (another installer): retry the lock for a while.
        res = subprocess.run(
            [cmd[0], "-o", "DPkg::Lock::Timeout=300", *cmd[1:]],
            env=env, capture_output=True, text=True, timeout=900,
        )
        if res.returncode != 0:
            raise PbxError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
    if not shutil.which("mmdebstrap"):
        raise PbxError("mmdebstrap still missing after apt-get install")


def _mmdebstrap(target: Path, mirror: str, log: Path, insecure: bool) -> int:
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        f"--include={','.join(PACKAGES)}",
        '--aptopt=Acquire::Check-Valid-Until "false"',
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
    ]
    if insecure:
        # Last resort, only when unstable's Release signature cannot be checked with the
        # host's keyring (e.g. an old debian-archive-keyring that lacks a new archive key).
        cmd += ['--aptopt=Acquire::AllowInsecureRepositories "true"',
                '--aptopt=APT::Get::AllowUnauthenticated "true"']
        source = f"deb [trusted=yes] {mirror} {SUITE} main"
    else:
        source = f"deb {mirror} {SUITE} main"
    cmd += [SUITE, str(target), source]
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=3000).returncode


def ensure_rootfs(path: Path | str | None = None) -> Path:
    """Build the Debian unstable root folder once (with Asterisk 22 and SIPp) and return it.

    Builds into a temporary sibling folder, stamps it, then renames it into place, so an
    interrupted build never leaves a half root. Concurrent callers wait on a lock file.
    """
    root = root_path(path)
    if rootfs_ready(root):
        return root
    if os.geteuid() != 0:
        raise PbxError("building the Asterisk root folder needs root (mmdebstrap, chroot)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f".{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rootfs_ready(root):
            return root
        # Leftovers of interrupted builds (we hold the lock: nobody else is building).
        for stale in root.parent.glob(f".{root.name}.*-*"):
            if stale.is_dir() and (".tmp-" in stale.name or ".old-" in stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        _ensure_mmdebstrap()
        mirror = apt_mirror()
        log = root.parent / f"{root.name}.build.log"
        log.write_bytes(b"")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        started = time.monotonic()
        rc = 1
        for insecure in (False, True):
            shutil.rmtree(tmp, ignore_errors=True)
            rc = _mmdebstrap(tmp, mirror, log, insecure)
            if rc == 0:
                break
            text = log.read_text(errors="replace")
            if not re.search(r"NO_PUBKEY|not signed|signature|EXPKEYSIG|InRelease", text):
                break  # not a signature problem: don't retry insecurely
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = log.read_text(errors="replace")[-3000:]
            raise PbxError(f"mmdebstrap failed (exit {rc}); log {log}:\n{tail}")
        stamp = {**_wanted_stamp(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "build_seconds": round(time.monotonic() - started, 1),
                 "insecure": insecure, "asterisk": _dpkg_version(tmp, "asterisk")}
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
    return root


def _dpkg_version(root: Path, package: str) -> str | None:
    try:
        status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(rf"^Package: {re.escape(package)}\n(?:[^\n]+\n)*?Version: (\S+)", status, re.M)
    return m.group(1) if m else None


def pbx_unavailable_reason(path: Path | str | None = None, build: bool = True) -> str | None:
    """Why the PBX tier cannot run here, or None when it can (building the root if needed)."""
    if os.geteuid() != 0:
        return "the Asterisk test bed needs root (chroot, mount namespaces, mmdebstrap)"
    if not shutil.which("unshare") or not shutil.which("chroot"):
        return "unshare/chroot (util-linux, coreutils) are missing"
    try:
        res = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a mount namespace: {exc}"
    if res.returncode != 0:
        return f"cannot create a mount namespace: {res.stderr.decode(errors='replace').strip()}"
    if rootfs_ready(path):
        return None
    if not build:
        return f"no Asterisk root folder at {root_path(path)}"
    try:
        ensure_rootfs(path)
    except (PbxError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot build the Asterisk root folder: {exc}"
    return None


# --------------------------------------------------------------------------- helpers


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free right now on `host` (TCP by default, SOCK_DGRAM for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _in_root(root: Path, inner: str) -> Path:
    """`inner` (an absolute path inside the chroot) as a host path; refuses symlinked parents
    (an absolute symlink in the root would point out of it when followed from the host)."""
    p = root / inner.lstrip("/")
    cur = root
    for part in Path(inner.lstrip("/")).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise PbxError(f"{cur} is a symlink; refusing to write through it")
    return p


def split_sections(text: str) -> list[tuple[str | None, list[str]]]:
    """Split an Asterisk .conf into (section name or None for the preamble, lines)."""
    out: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        m = re.match(r"\s*\[([^]]+)\]", line)
        if m:
            out.append((m.group(1).strip(), [line]))
        else:
            out[-1][1].append(line)
    return out


# The shipped manager.conf holds a sample secret that `prepaid serve` refuses: the test bed
# gives its users this one instead (one per test process, never the sample's).
METERING_SECRET = secrets.token_urlsafe(18)
_SECRET_LINE = re.compile(r"(\s*secret\s*=\s*)\S+")


def project_ami_user() -> tuple[str, str]:
    """The metering user of asterisk-conf/manager.conf (not the test bed's all-rights user)
    and the secret the test bed gives it in place of the sample's."""
    for name, lines in split_sections((PROJECT_CONF / "manager.conf").read_text()):
        if name and name.lower() != "general":
            for line in lines:
                if _SECRET_LINE.match(line):
                    return name, METERING_SECRET
    raise PbxError("asterisk-conf/manager.conf has no AMI user with a secret")


def _conf_key(line: str) -> str | None:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*=>?", line)
    return m.group(1).lower() if m else None


def _render(template: str, values: dict[str, str]) -> str:
    text = (CONF_TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise PbxError(f"{template}: unfilled placeholders {sorted(set(left))}")
    return text


_running: weakref.WeakSet[Pbx] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for pbx in list(_running):
        with contextlib.suppress(Exception):
            pbx.stop()


# --------------------------------------------------------------------------- the PBX


class Pbx:
    """Asterisk 22 chrooted into the cached root folder, on free ports on 127.0.0.1."""

    ami_username = "testbed"

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        agi_port: int = 4573,
        agi_host: str = "127.0.0.1",
        hangup_after: int = 3,
        sip_context: str = "prepaid-outbound",
        project_conf: Path | None = PROJECT_CONF,
        project_sounds: Path | None = PROJECT_SOUNDS,
        boot_timeout: float = 60.0,
        system_name: str = "",
        trunk: str = "local",
        sip_accounts: Iterable[str] = (),
        agi_secret: str = "",
    ) -> None:
        if system_name and not re.fullmatch(r"[A-Za-z0-9_.-]+", system_name):
            raise PbxError(f"system_name {system_name!r}: letters, digits, '_', '.', '-' only")
        if trunk not in TRUNKS:
            raise PbxError(f"trunk {trunk!r}: one of {', '.join(TRUNKS)}")
        accounts = list(dict.fromkeys(sip_accounts))
        bad = [a for a in accounts if not SIP_ACCOUNT.fullmatch(a) or a in ("sipp", "my-trunk")]
        if bad:
            raise PbxError(f"sip_accounts {bad!r}: plain names only (letters, digits, _.+-)")
        if accounts and trunk != "sip":
            raise PbxError("sip_accounts need trunk='sip'")
        self.root = ensure_rootfs(root)
        self.agi_host = agi_host
        self.agi_port = agi_port
        # PREPAID_AGI_SECRET in [globals]: the shipped dialplan passes it to the AGI.
        self.agi_secret = agi_secret
        self.hangup_after = hangup_after
        self.sip_context = sip_context
        self.project_conf = project_conf
        self.project_sounds = project_sounds
        self.boot_timeout = boot_timeout
        # Asterisk's `systemname` (asterisk.conf): it prefixes every uniqueid with it.
        self.system_name = system_name
        self.trunk = trunk
        self.sip_accounts = tuple(accounts)
        self.ami_port = 0
        self.sip_port = 0
        self.sipp_port = 0
        # trunk="sip": where my-trunk sends its INVITEs (the far-end SIPp's UDP port).
        self.farend_port = 0
        self.ami_secret = secrets.token_hex(12)
        self.run_id = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None

    # -- paths -------------------------------------------------------------------------
    @property
    def run_dir_inner(self) -> str:
        """The per-run directory as Asterisk sees it (inside the chroot)."""
        return f"{RUNS_DIR}/{self.run_id}"

    @property
    def run_dir(self) -> Path:
        return self.root / self.run_dir_inner.lstrip("/")

    @property
    def etc_dir(self) -> Path:
        return self.run_dir / "etc"

    @property
    def log_path(self) -> Path:
        """Asterisk's `full` log (verbose 5: dialplan steps, AGI, Playback)."""
        return self.run_dir / "log" / "full"

    @property
    def messages_path(self) -> Path:
        return self.run_dir / "log" / "messages"

    @property
    def cdr_csv_path(self) -> Path:
        """cdr_csv's Master.csv (testbed/pbx_conf/cdr.conf): what tests check charges against."""
        return self.run_dir / "log" / "cdr-csv" / "Master.csv"

    @property
    def cdr_custom_path(self) -> Path:
        """cdr_custom's prepaid.csv (the shipped asterisk-conf/cdr_custom.conf), host side:
        the product's listener reads it ([ami] cdr_file); tests check against Master.csv."""
        return self.run_dir / "log" / "cdr-custom" / "prepaid.csv"

    @property
    def sounds_dir(self) -> Path:
        """Asterisk's sounds directory on the host side; project prompts are in `prepaid/`."""
        return self.root / SOUNDS_DIR.lstrip("/")

    @property
    def conf_inner(self) -> str:
        return f"{self.run_dir_inner}/etc/asterisk.conf"

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Pbx:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Pbx:
        if self.proc is not None:
            raise PbxError("already started")
        self._prune_runs()
        self.run_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        # cdr_csv and cdr_custom write into these but never create them (Debian's package
        # does, under /var/log/asterisk).
        for sub in ("etc", "run", "log", "log/cdr-csv", "log/cdr-custom", "spool", "db",
                    "cache"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
        self.ami_port = free_port(socket.SOCK_STREAM)
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.sipp_port = free_port(socket.SOCK_DGRAM)
        self.farend_port = free_port(socket.SOCK_DGRAM) if self.trunk == "sip" else 0
        self.write_config()
        self.install_sounds()
        out = (self.run_dir / "log" / "stdout").open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.chroot_command([ASTERISK_BIN, "-f", "-n", "-C", self.conf_inner]),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=self._env(),
        )
        out.close()
        _running.add(self)
        try:
            self._wait_booted(started)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def chroot_command(self, argv: list[str]) -> list[str]:
        """`argv` run chrooted into the root, in a private mount namespace with /dev and
        /proc mounted (the mounts vanish with the namespace's last process)."""
        script = ('mount --bind /dev "$0/dev" && mount -t proc proc "$0/proc" && '
                  'exec chroot "$0" "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                str(self.root), *argv]

    def sipp(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run SIPp (from the root) with `args`; pass the target as f"127.0.0.1:{sip_port}".
        Calls from 127.0.0.1 are the `sipp` PJSIP endpoint; they enter `sip_context`."""
        return subprocess.run(
            self.chroot_command(["/usr/bin/sipp", *args]), capture_output=True, text=True,
            timeout=timeout, env=self._env(), stdin=subprocess.DEVNULL,
            cwd=self.run_dir,
        )

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

    def _wait_booted(self, started: float) -> None:
        deadline = started + self.boot_timeout
        last = ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PbxError(f"Asterisk exited with {self.proc.returncode} while booting\n"
                               + self.log_tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PbxError(f"Asterisk not fully booted after {self.boot_timeout}s "
                               f"({last.strip()})\n" + self.log_tail())
            if (self.run_dir / "run" / "asterisk.ctl").exists():
                res = self._asterisk_rx("core waitfullybooted", timeout=remaining)
                last = res.stdout + res.stderr
                if res.returncode == 0 and "fully booted" in last.lower():
                    break
            # Bounded poll for the control socket to appear; not a sleep for luck.
            time.sleep(0.05)
        # The manager listener is up once booted; check that it is ours (port race).
        try:
            with socket.create_connection(("127.0.0.1", self.ami_port), timeout=5) as s:
                s.settimeout(5)
                banner = s.recv(100)
        except OSError as exc:
            raise PbxError(f"AMI not listening on {self.ami_port}: {exc}\n"
                           + self.log_tail()) from exc
        if not banner.startswith(b"Asterisk Call Manager/"):
            raise PbxError(f"port {self.ami_port} is not Asterisk's AMI: {banner!r}")

    def stop(self) -> None:
        """Stop Asterisk (`core stop now`, then SIGTERM/SIGKILL to its process group).

        The /proc and /dev mounts live in Asterisk's private mount namespace and vanish
        with it. The per-run directory stays (logs) until a later start prunes it.
        """
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._asterisk_rx("core stop now", timeout=10)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                # Children (e.g. System()) may outlive Asterisk in the group: go on killing.
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _prune_runs(self) -> None:
        """Remove run directories whose owning process is gone (keeps logs of live runs)."""
        runs = self.root / RUNS_DIR.lstrip("/")
        if not runs.is_dir():
            return
        for d in runs.iterdir():
            try:
                pid = int((d / "owner.pid").read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid() or (pid and Path(f"/proc/{pid}").exists()):
                continue
            shutil.rmtree(d, ignore_errors=True)

    # -- commands ----------------------------------------------------------------------
    def _asterisk_rx(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", str(self.root), ASTERISK_BIN, "-C", self.conf_inner, "-rx", command],
            capture_output=True, text=True, timeout=timeout, env=self._env(),
            stdin=subprocess.DEVNULL,
        )

    def cli(self, command: str, timeout: float = 30) -> str:
        """Run an Asterisk CLI command (`asterisk -rx`) and return its output."""
        if self.proc is None:
            raise PbxError("Asterisk is not running")
        res = self._asterisk_rx(command, timeout=timeout)
        if res.returncode != 0:
            raise PbxError(f"asterisk -rx {command!r} failed ({res.returncode}): "
                           f"{res.stdout}{res.stderr}")
        return res.stdout

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for p in (self.log_path, self.run_dir / "log" / "stdout"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {p} ---\n" + p.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """Wait (bounded) until `pattern` (a regex) appears in the full log after offset
        `start`; returns the match. Use `len(pbx.log_text())` as `start` to skip old lines."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text(), start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in {self.log_path} after {timeout}s\n"
                                   + self.log_tail())
            time.sleep(0.05)

    # -- configuration -----------------------------------------------------------------
    def _project_files(self) -> dict[str, str]:
        if self.project_conf is None or not self.project_conf.is_dir():
            return {}
        return {p.name: p.read_text() for p in sorted(self.project_conf.glob("*.conf"))}

    def _agi_rewrite(self, text: str) -> str:
        return AGI_URL.sub(f"agi://{self.agi_host}:{self.agi_port}", text)

    def write_config(self) -> None:
        """Render the per-run configuration into `etc_dir`."""
        values = {
            "RUN": self.run_dir_inner,
            "MODDIR": self._moddir(),
            "AMI_PORT": str(self.ami_port),
            "AMI_USER": self.ami_username,
            "AMI_SECRET": self.ami_secret,
            "SIP_PORT": str(self.sip_port),
            "SIPP_PORT": str(self.sipp_port),
            "SIP_CONTEXT": self.sip_context,
            "AGI_HOST": self.agi_host,
            "AGI_PORT": str(self.agi_port),
            "AGI_SECRET": self.agi_secret,
            "HANGUP_AFTER": str(self.hangup_after),
            "TRUNK_GLOBALS": self._trunk_globals(),
            "IDENTIFY_ORDER": "ip" if self.trunk == "local" else "username,ip",
            "SIP_TRUNK": self._sip_trunk_conf(),
            "RTP_START": "10000",
            "RTP_END": "20000",
            "SYSTEM_NAME": (f"systemname = {self.system_name}" if self.system_name
                            else "; systemname unset (Pbx(system_name=...) sets it)"),
        }
        project = self._project_files()
        files: dict[str, str] = {}
        for tpl in sorted(CONF_TEMPLATES.glob("*.conf")):
            if tpl.name in {"globals.conf", "manager.conf", "extensions.conf"}:
                continue
            files[tpl.name] = _render(tpl.name, values)
        files["modules.conf"] = self._filter_modules(files["modules.conf"])
        # Root's stock tone tables, so Busy()/Congestion()/Ringing() have tones.
        stock = self.root / "etc/asterisk/indications.conf"
        if stock.exists():
            files["indications.conf"] = stock.read_text()
        for name, text in project.items():
            if name in OWNED_CONFS or name in {"extensions.conf", "manager.conf"}:
                continue
            files[name] = self._agi_rewrite(text)
        files["manager.conf"] = self._manager_conf(project.get("manager.conf"), values)
        files["extensions.conf"] = self._extensions_conf(project.get("extensions.conf"), values)
        for name, text in files.items():
            (self.etc_dir / name).write_text(text)

    def _trunk_globals(self) -> str:
        if self.trunk == "local":
            return "PREPAID_DIAL_PREFIX = Local/\nPREPAID_DIAL_SUFFIX ="
        return ("; trunk=sip: the shipped PREPAID_DIAL_PREFIX/SUFFIX stand "
                "(Dial(PJSIP/<number>@my-trunk))")

    def _sip_trunk_conf(self) -> str:
        """trunk="sip": my-trunk (to the far-end SIPp) and one endpoint per account."""
        if self.trunk == "local":
            return "; trunk=local: no my-trunk, no account endpoints"
        values = {"FAREND_PORT": str(self.farend_port), "SIP_CONTEXT": self.sip_context}
        parts = [_render("pjsip_trunk.conf.in", values)]
        for account in self.sip_accounts:
            parts.append(_render("pjsip_account.conf.in", {**values, "ACCOUNT": account}))
        return "\n".join(parts)

    def _moddir(self) -> str:
        for cand in sorted((self.root / "usr/lib").glob("*/asterisk/modules")):
            return "/" + str(cand.relative_to(self.root))
        return "/usr/lib/asterisk/modules"

    def _filter_modules(self, text: str) -> str:
        moddir = self.root / self._moddir().lstrip("/")
        lines = []
        for line in text.splitlines():
            m = re.match(r"\s*load\s*=>?\s*(\S+)", line)
            if m and not (moddir / m.group(1)).exists():
                lines.append(f"; not installed: {line.strip()}")
            else:
                lines.append(line)
        return "\n".join(lines) + "\n"

    def _manager_conf(self, project: str | None, values: dict[str, str]) -> str:
        general: list[str] = []
        users: list[str] = []
        if project:
            for name, lines in split_sections(project):
                if name is None:
                    users.extend(lines)
                elif name.lower() == "general":
                    general.extend(
                        ln for ln in lines[1:] if (_conf_key(ln) or "") not in MANAGER_CONTROLLED
                    )
                else:
                    users.extend(_SECRET_LINE.sub(rf"\g<1>{METERING_SECRET}", ln)
                                 for ln in lines)
        values = {**values, "PROJECT_GENERAL": "\n".join(
            ["; from asterisk-conf/manager.conf [general]:", *general] if general else [])}
        text = _render("manager.conf", values)
        if users:
            text += "\n; ---- users from asterisk-conf/manager.conf ----\n"
            text += "\n".join(users) + "\n"
        return text

    def _extensions_conf(self, project: str | None, values: dict[str, str]) -> str:
        globals_lines = _render("globals.conf", values).splitlines()
        sections = split_sections(self._agi_rewrite(project)) if project else [(None, [])]
        out: list[str] = []
        had_globals = False
        for name, lines in sections:
            out.extend(lines)
            if name is not None and name.lower() == "globals":
                had_globals = True
                out.extend(globals_lines)
        if not had_globals:
            out = ["[globals]", *globals_lines, "", *out]
        header = [
            "; Generated by testbed/pbx.py: asterisk-conf/extensions.conf (agi:// rewritten",
            f"; to agi://{self.agi_host}:{self.agi_port}) + testbed/pbx_conf/globals.conf in",
            "; [globals] + testbed/pbx_conf/extensions.conf.",
            "",
        ]
        return "\n".join([*header, *out, "", _render("extensions.conf", values)])

    # -- CDRs --------------------------------------------------------------------------
    def cdr_rows(self) -> list[Cdr]:
        """Every row of Master.csv so far, in the order Asterisk wrote them."""
        try:
            text = self.cdr_csv_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]  # a record being written right now
        rows = []
        for n, fields in enumerate(csv.reader(text.splitlines()), 1):
            if not fields:
                continue
            if len(fields) != len(CDR_CSV_COLUMNS):
                raise PbxError(f"{self.cdr_csv_path}:{n}: {len(fields)} columns, expected "
                               f"{len(CDR_CSV_COLUMNS)} ({', '.join(CDR_CSV_COLUMNS)})")
            d = dict(zip(CDR_CSV_COLUMNS, fields, strict=True))
            rows.append(Cdr(
                uniqueid=d["uniqueid"], accountcode=d["accountcode"], src=d["src"],
                dst=d["dst"], dcontext=d["dcontext"], clid=d["clid"], channel=d["channel"],
                dstchannel=d["dstchannel"], lastapp=d["lastapp"], lastdata=d["lastdata"],
                start=d["start"], answer=d["answer"], end=d["end"],
                duration=int(d["duration"]), billsec=int(d["billsec"]),
                disposition=d["disposition"], amaflags=d["amaflags"]))
        return rows

    def cdrs(self) -> dict[str, Cdr]:
        """Master.csv keyed by the caller channel's uniqueid (the call's PREPAID_CALLREF).
        A uniqueid with several rows (a forked CDR) raises: no test bed call makes one."""
        out: dict[str, Cdr] = {}
        for cdr in self.cdr_rows():
            if cdr.uniqueid in out:
                raise PbxError(f"uniqueid {cdr.uniqueid} has several CDRs: "
                               f"{out[cdr.uniqueid]} and {cdr}")
            out[cdr.uniqueid] = cdr
        return out

    def install_sounds(self) -> list[Path]:
        """Copy the project's prompts (sounds/*.wav, *.ulaw, ...) to `sounds_dir/prepaid/`,
        so `Playback(prepaid/<name>)` finds them."""
        dest = _in_root(self.root, f"{SOUNDS_DIR}/prepaid/x")
        dest = dest.parent
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        if self.project_sounds is not None and self.project_sounds.is_dir():
            for src in sorted(self.project_sounds.iterdir()):
                if src.suffix.lower() not in {".wav", ".ulaw", ".alaw", ".gsm", ".sln", ".g722",
                                              ".sln16", ".wav16"}:
                    continue
                tmp = dest / f".{src.name}.tmp-{os.getpid()}"
                shutil.copyfile(src, tmp)
                tmp.replace(dest / src.name)
                copied.append(dest / src.name)
        return copied

    def prompts(self) -> list[str]:
        """Installed project prompts as Playback() names, e.g. 'prepaid/balance-too-low'."""
        d = self.sounds_dir / "prepaid"
        return sorted({f"prepaid/{p.stem}" for p in d.iterdir() if not p.name.startswith(".")}
                      ) if d.is_dir() else []


@contextlib.contextmanager
def start_pbx(root: Path | str | None = None, **kwargs: object) -> Iterator[Pbx]:
    """`with start_pbx(agi_port=...) as pbx:` — a started Pbx, stopped on exit."""
    pbx = Pbx(root, **kwargs)  # type: ignore[arg-type]
    pbx.start()
    try:
        yield pbx
    finally:
        pbx.stop()
