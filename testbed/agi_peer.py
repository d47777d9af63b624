"""A test AGI peer: plays Asterisk's side of an AGI session over the real wire format.

It sends the ``agi_*: value`` header and a blank line, then reads each command line and
answers as Asterisk does (``200 result=1``, ``200 result=1 (value)``, ``HANGUP`` + ``511``).
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from agi.decision import warning_limit

# Prompts play to their end (no key cuts them short).
PLAYED = {"STREAM FILE": "200 result=0 endpos=12000", "SAY NUMBER": "200 result=0",
          "SAY DIGITS": "200 result=0"}
DEAD = "511 Command Not Permitted on a dead channel or intercepted routine"


def agi_env(uniqueid: str = "1700000000.1", extension: str = "00491701234567", *,
            callerid: str = "1001", accountcode: str | None = None, script: str = "authorize",
            port: int = 4573, **extra: str) -> dict[str, str]:
    """The header Asterisk 22 sends for AGI(agi://127.0.0.1:<port>/<script>). The phone's
    endpoint has an accountcode: by default its caller ID, as the install notes set it."""
    if accountcode is None:
        accountcode = callerid
    env = {
        "agi_network": "yes", "agi_network_script": script,
        "agi_request": f"agi://127.0.0.1:{port}/{script}",
        "agi_channel": f"PJSIP/{callerid or 'anon'}-00000001", "agi_language": "en",
        "agi_type": "PJSIP", "agi_uniqueid": uniqueid, "agi_version": "22.0.0",
        "agi_callerid": callerid or "unknown", "agi_calleridname": "Test",
        "agi_callingpres": "0", "agi_callingani2": "0", "agi_callington": "0",
        "agi_callingtns": "0", "agi_dnid": extension, "agi_rdnis": "unknown",
        "agi_context": "prepaid-outbound", "agi_extension": extension, "agi_priority": "2",
        "agi_enhanced": "0.0", "agi_accountcode": accountcode, "agi_threadid": "140000000",
    }
    env.update(extra)
    return env


@dataclass
class AgiPeer:
    env: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)  # what GET VARIABLE finds
    hangup_at: str | None = None  # hang up when a command starts with this
    on_hangup: Callable[[], None] | None = None  # e.g. send SIGHUP to a process AGI
    hold_reply: asyncio.Event | None = None  # wait for this before answering hangup_at
    commands: list[str] = field(default_factory=list)
    set_vars: dict[str, str] = field(default_factory=dict)
    closed_by_server: bool = False
    dead: bool = False
    # What the caller keys, one entry per input: WAIT FOR DIGIT takes one ("1"), GET DATA
    # one up to '#' ("1234#"); none left is a time-out. Prompts play to their end.
    keys: list[str] = field(default_factory=list)

    def reply(self, command: str) -> list[str]:
        if self.dead:
            return [DEAD]
        if self.hangup_at is not None and command.startswith(self.hangup_at):
            self.dead = True
            if self.on_hangup is not None:
                self.on_hangup()
                return [DEAD]
            return ["HANGUP", DEAD]
        words = shlex.split(command)
        verb = " ".join(words[:2]).upper()
        if verb == "SET VARIABLE" and len(words) == 4:
            self.set_vars[words[2]] = words[3]
            return ["200 result=1"]
        if verb == "EXEC MSET" and len(words) == 3:  # MSet(a=1,b=2): split at ',' then '='
            for pair in words[2].split(","):
                name, _, value = pair.partition("=")
                self.set_vars[name] = value
            return ["200 result=0"]
        if verb == "GET FULL" and len(words) == 4 and words[2].upper() == "VARIABLE":
            # Asterisk substitutes every ${...}; a channel's linkedid is its uniqueid.
            known = {"CHANNEL(linkedid)": self.env.get("agi_uniqueid", ""), **self.variables}
            value = re.sub(r"\$\{([^}]*)\}", lambda m: known.get(m[1], ""), words[3])
            return [f"200 result=1 ({value})"]
        if verb == "GET VARIABLE" and len(words) == 3:
            found = self.variables.get(words[2])
            return ["200 result=0"] if found is None else [f"200 result=1 ({found})"]
        if verb in PLAYED:
            return [PLAYED[verb]]
        if verb in ("WAIT FOR", "GET DATA"):
            return self._keyed(verb, words)
        if words and words[0].upper() == "ANSWER":
            return ["200 result=0"]
        if words and words[0].upper() == "HANGUP":
            self.dead = True
            return ["200 result=1"]
        return ["510 Invalid or unknown command"]

    def _keyed(self, verb: str, words: list[str]) -> list[str]:
        """WAIT FOR DIGIT <ms> and GET DATA <file> <ms> <max digits>, from ``keys``."""
        typed = self.keys.pop(0) if self.keys else ""
        if verb == "WAIT FOR" and words[2:3] == ["DIGIT"]:
            return [f"200 result={ord(typed[0]) if typed else 0}"]
        if len(words) == 5:
            typed = typed.split("#", 1)[0][:int(words[4])]
            return [f"200 result={typed}" if typed else "200 result= (timeout)"]
        return ["510 Invalid or unknown command"]

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  within: float = 10.0) -> list[str]:
        """Send the header, answer commands until the other side closes; return the commands."""
        header = "".join(f"{k}: {v}\n" for k, v in self.env.items()) + "\n"
        writer.write(header.encode())
        await writer.drain()
        async with asyncio.timeout(within):
            while True:
                line = await reader.readline()
                if not line:
                    self.closed_by_server = True
                    return self.commands
                command = line.decode().rstrip("\n")
                self.commands.append(command)
                if (self.hold_reply is not None and self.hangup_at is not None
                        and command.startswith(self.hangup_at)):
                    await self.hold_reply.wait()
                for out in self.reply(command):
                    writer.write(out.encode() + b"\n")
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    return self.commands

    async def call(self, port: int, host: str = "127.0.0.1", within: float = 10.0) -> list[str]:
        """One FastAGI call over TCP, as Asterisk's AGI(agi://host:port/...) makes it."""
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await self.run(reader, writer, within)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


def variable_commands(status: str, reason: str, account: str, ref: str, max_seconds: str,
                      dial_limit: str, low_balance: str | None = None,
                      max_call_seconds: int = 3 * 3600) -> list[str]:
    """The command that sets the authorize route's variables: one EXEC MSet."""
    pairs = [f"PREPAID_STATUS={status}", f"PREPAID_REASON={reason}",
             f"PREPAID_ACCOUNT={account}", f"PREPAID_CALLREF={ref}",
             f"PREPAID_MAX_SECONDS={max_seconds}", f"PREPAID_DIAL_LIMIT={dial_limit}"]
    if status == "ALLOWED":
        limit = warning_limit(int(max_seconds), max_call_seconds, 60_000)
        pairs += ["LIMIT_WARNING_FILE=prepaid/credit-expires-in-one-minute",
                  f"PREPAID_WARNING_LIMIT={limit}",
                  f"PREPAID_LOW_BALANCE={low_balance or '0'}", "PREPAID_RING_SECONDS=60",
                  f"PREPAID_TIMEOUT={int(max_seconds) + 60}"]
    return ["EXEC MSet " + ",".join(pairs)]


GET_CALLER = "GET FULL VARIABLE \"${CHANNEL(linkedid)}/${PREPAID_ACCOUNT}\""


DENY_TAIL = ["ANSWER", 'STREAM FILE prepaid/call-cannot-be-completed ""', "HANGUP"]
NO_CREDIT_TAIL = ["ANSWER", 'STREAM FILE prepaid/balance-too-low ""', "HANGUP"]
