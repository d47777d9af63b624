"""Proves the Asterisk test bed: boots on free ports, AMI works, calls produce events and CDRs,
project prompts play, the fake trunk's variants behave, SIPp can call in."""

from __future__ import annotations

import asyncio
import re
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from testbed.ami import Ami, event
from testbed.pbx import METERING_SECRET, PROJECT_SOUNDS, Pbx

pytestmark = pytest.mark.pbx


@pytest.fixture
async def ami(pbx: Pbx) -> AsyncIterator[Ami]:
    client = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    yield client
    await client.close()


def _write_tone(path: Path, seconds: float = 0.3) -> None:
    """A short 8 kHz mono 16-bit WAV, the format Asterisk's format_wav plays."""
    import math

    frames = bytearray()
    for i in range(int(8000 * seconds)):
        sample = int(8000 * math.sin(2 * math.pi * 440 * i / 8000))
        frames += sample.to_bytes(2, "little", signed=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(frames))


def test_boots_on_free_ports(pbx: Pbx) -> None:
    assert pbx.ami_port not in (0, 5038)
    assert pbx.sip_port not in (0, 5060)
    assert "Asterisk 22" in pbx.cli("core show version")
    assert f"127.0.0.1:{pbx.sip_port}" in pbx.cli("pjsip show transports")
    modules = pbx.cli("module show")
    for absent in ("chan_iax2", "res_http", "pbx_dundi", "res_ari"):
        assert absent not in modules
    for present in ("cdr_manager", "res_agi", "chan_pjsip", "pbx_config"):
        assert present in modules
    assert pbx.boot_seconds is not None and pbx.boot_seconds < 30


async def test_ami_originate_events_cdr_and_playback(
    make_pbx: Callable[..., Pbx], tmp_path: Path
) -> None:
    # A project prompt if there is one; else one made here (same install path).
    prompts = sorted(p for p in PROJECT_SOUNDS.glob("*.wav")) if PROJECT_SOUNDS.is_dir() else []
    if prompts:
        names = [p.stem for p in prompts]
        stem = "balance-too-low" if "balance-too-low" in names else names[0]
        pbx = make_pbx()
    else:
        _write_tone(tmp_path / "testbed-tone.wav")
        stem = "testbed-tone"
        pbx = make_pbx(project_sounds=tmp_path)
    assert f"prepaid/{stem}" in pbx.prompts()

    ami = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    try:
        assert ami.banner.startswith("Asterisk Call Manager/")
        resp = await ami.action(
            "Originate", Channel="Local/100@testbed-trunk", Application="Playback",
            Data=f"prepaid/{stem}", CallerID="Alice <1001>", Async="true",
        )
        assert resp["Response"] == "Success"
        new = await ami.wait_event(event("Newchannel", Channel=r"^Local/100@testbed-trunk"))
        assert "Timestamp" in new  # timestampevents=yes
        await ami.wait_event(event("Hangup", Channel=re.escape(new["Channel"])), within=15)
        cdr = await ami.wait_event(event("Cdr"), within=10)
        assert cdr["Disposition"] == "ANSWERED"
        assert cdr["LastApplication"] == "Playback"
    finally:
        await ami.close()
    pbx.wait_for_log(rf"Playing '{re.escape(f'prepaid/{stem}')}\.", timeout=5)


@pytest.mark.parametrize(
    ("number", "dialstatus"),
    [("0033140000000", "BUSY"), ("0034140000000", "CONGESTION"), ("00390612345678", "ANSWER")],
)
async def test_trunk_variants_via_prepaid_trunk(
    pbx: Pbx, ami: Ami, number: str, dialstatus: str
) -> None:
    """Dial(${PREPAID_DIAL_PREFIX}<number>${PREPAID_DIAL_SUFFIX}) as the project dialplan
    does reaches the fake trunk."""
    resp = await ami.action(
        "Originate", Channel=f"Local/{number}@testbed-dial", Application="Wait",
        Data="2", Async="true",
    )
    assert resp["Response"] == "Success"
    end = await ami.wait_event(
        event("DialEnd", DestChannel=f"^Local/{number}@default-"), within=10
    )
    assert end["DialStatus"] == dialstatus


async def test_trunk_callee_hangs_up_after_n_seconds(
    make_pbx: Callable[..., Pbx]
) -> None:
    pbx = make_pbx(hangup_after=1)
    ami = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    try:
        await ami.action(
            "Originate", Channel="Local/00442071234567@testbed-trunk", Application="Wait",
            Data="10", Async="true",
        )
        up = await ami.wait_event(event("Newstate", ChannelStateDesc="^Up$"))
        hangup = await ami.wait_event(event("Hangup", Channel=r";2$"), within=6)
        elapsed = float(hangup["Timestamp"]) - float(up["Timestamp"])
        assert 0.5 < elapsed < 3
    finally:
        await ami.close()


def test_sipp_call_enters_the_sip_context(make_pbx: Callable[..., Pbx]) -> None:
    pbx = make_pbx(sip_context="testbed-trunk")
    res = pbx.sipp(
        ["-sn", "uac", "-s", "00390612345678", "-m", "1", "-d", "200",
         "-i", "127.0.0.1", "-p", str(pbx.sipp_port), "-timeout", "15s", "-timeout_error",
         f"127.0.0.1:{pbx.sip_port}"],
        timeout=30,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    pbx.wait_for_log(r"Executing \[00390612345678@testbed-trunk:\d+\] Answer\(\"PJSIP/sipp-")


def test_record_ami_saves_raw_stream(pbx: Pbx, tmp_path: Path) -> None:
    from testbed.record_ami import record

    out = tmp_path / "busy.ami"
    n = record(
        out, "127.0.0.1", pbx.ami_port, pbx.ami_username, pbx.ami_secret, timeout=15,
        actions=["Action: Originate; ActionID: orig-1; Channel: Local/0033140000000@testbed-dial;"
                 " Application: Wait; Data: 1; CallerID: Alice <1001>; Async: true"],
        until_event="Cdr",
    )
    raw = out.read_bytes()
    messages = raw.split(b"\r\n\r\n")
    assert messages[-1] == b"" and len(messages) - 1 == n
    assert b"\r\nActionID: orig-1\r\n" in raw
    assert raw.count(b"Event: Cdr\r\n") == 1
    assert b"Disposition: BUSY\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")


PROJECT_EXTENSIONS = """\
[globals]
PREPAID_DIAL_PREFIX = PJSIP/
PREPAID_DIAL_SUFFIX = @carrier

[prepaid-outbound]
exten => _X.,1,NoOp(prepaid call to ${EXTEN} from ${CALLERID(num)})
 same => n,AGI(agi://127.0.0.1:4573/authorize)
 same => n,Dial(${PREPAID_DIAL_PREFIX}${EXTEN}${PREPAID_DIAL_SUFFIX},10)
 same => n,Hangup()
"""

PROJECT_MANAGER = """\
[general]
enabled = yes
port = 5038
bindaddr = 0.0.0.0

[prepaid]
secret = s3cret
read = call,cdr
write = call
"""


async def test_project_conf_merged_and_fastagi_reached(
    make_pbx: Callable[..., Pbx], tmp_path: Path
) -> None:
    """The project's dialplan runs with its agi:// pointed at the test's FastAGI server and its
    PREPAID_DIAL_PREFIX/SUFFIX replaced by the fake trunk's; its AMI user exists; a SIPp call
    goes through."""
    conf = tmp_path / "asterisk-conf"
    conf.mkdir()
    (conf / "extensions.conf").write_text(PROJECT_EXTENSIONS)
    (conf / "manager.conf").write_text(PROJECT_MANAGER)
    requests: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    async def fastagi(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        env: dict[str, str] = {}
        while (line := (await reader.readline()).decode().strip()):
            key, _, value = line.partition(": ")
            env[key] = value
        writer.write(b"SET VARIABLE PREPAID_AUTHORIZED yes\n")
        await writer.drain()
        env["reply"] = (await reader.readline()).decode().strip()
        requests.put_nowait(env)
        writer.close()

    server = await asyncio.start_server(fastagi, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pbx = make_pbx(agi_port=port, project_conf=conf)
        assert f"agi://127.0.0.1:{port}/authorize" in (pbx.etc_dir / "extensions.conf").read_text()
        assert "prepaid" in pbx.cli("manager show users")
        assert pbx.ami_port != 5038
        # The test bed gives the project's AMI users its own secret, whatever the file says.
        assert "s3cret" not in (pbx.etc_dir / "manager.conf").read_text()
        ami = await Ami.connect(pbx.ami_port, "prepaid", METERING_SECRET)
        try:
            res = await asyncio.to_thread(pbx.sipp, [
                "-sn", "uac", "-s", "00390612345678", "-m", "1", "-d", "200",
                "-i", "127.0.0.1", "-p", str(pbx.sipp_port), "-timeout", "15s",
                "-timeout_error", f"127.0.0.1:{pbx.sip_port}"], 30)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            env = await asyncio.wait_for(requests.get(), 5)
            assert env["agi_network_script"] == "authorize"
            assert env["agi_extension"] == "00390612345678"
            assert env["reply"].startswith("200 result=1")
            end = await ami.wait_event(
                event("DialEnd", DestChannel="^Local/00390612345678@default-")
            )
            assert end["DialStatus"] == "ANSWER"
            assert (await ami.wait_event(event("Cdr")))["Disposition"] == "ANSWERED"
        finally:
            await ami.close()
    finally:
        server.close()
        await server.wait_closed()
