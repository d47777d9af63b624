"""The shipped AMI user of asterisk-conf/manager.conf on the real Asterisk 22: its event
filters (in the legacy syntax Asterisk 18 and 20 accept too) let through exactly the events
metering uses, and nothing else; it may not originate calls."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from testbed.ami import Ami, Message
from testbed.pbx import project_ami_user
from tests.e2e.test_system_e2e import Call, System, system, until

__all__ = ["system"]  # the fixture
pytestmark = pytest.mark.pbx

EUR = 1_000_000
# What the tracker reads (ami_listener/tracker.py ON_EVENT and ON_CALL_EVENT, and the
# channel events that show a call is still up): VarSet only of PREPAID_* variables.
METERED = frozenset({"FullyBooted", "Newchannel", "Newstate", "DialBegin", "DialEnd",
                     "BridgeEnter", "BridgeLeave", "Hangup", "Rename", "Cdr",
                     "CoreShowChannel", "CoreShowChannelsComplete"})

Key = tuple[str, str, str, str]


def key(m: Message) -> Key:
    return (m.get("Event", ""), m.get("Uniqueid", "") or m.get("UniqueID", ""),
            m.get("Variable", ""), m.get("Value", ""))


def metered(m: Message) -> bool:
    name = m.get("Event", "")
    return name in METERED or (name == "VarSet" and m.get("Variable", "").startswith("PREPAID_"))


async def test_the_metering_user_gets_exactly_the_events_metering_uses(
        system: System) -> None:
    await system.start(("agi", "ami"))
    user, secret = project_ami_user()
    metering = await Ami.connect(system.pbx.ami_port, user, secret)
    since = len(system.ami.seen)  # the all-rights user's events from here on
    try:
        await system.account("sipp", 10 * EUR)
        number = "00880412345"  # answered, the far end hangs up after 4 s
        sipp = system.sipp_call(number, "sipp")
        ref = await system.sipp_ref("sipp")
        call = Call(ref, "sipp", number)
        assert await system.status(ref) == ("ALLOWED", "")
        await system.answered(call)
        await system.ended(call)
        res = await asyncio.wait_for(sipp, 30)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

        def streams() -> tuple[Counter[Key], Counter[Key]]:
            everything = system.ami.seen[since:]
            return (Counter(key(m) for m in everything if "Event" in m and metered(m)),
                    Counter(key(m) for m in metering.seen if "Event" in m))

        async def same() -> bool:
            wanted, got = streams()
            return wanted == got

        try:
            await until(same, "the metering user's events to be the metered ones", 10)
        except AssertionError:
            wanted, got = streams()
            raise AssertionError(f"missing {wanted - got}\nextra {got - wanted}") from None
        # Least rights: no originate (the dialplan's Dial L() plays the credit warning).
        refused = await metering.action("Originate", Channel="Local/s@prepaid-warning/n",
                                        Application="Wait", Data="1", Async="true")
        assert (refused["Response"], refused.get("Message")) == ("Error", "Permission denied")
    finally:
        await metering.close()
    everything = system.ami.seen[since:]
    arrived = {m["Event"] for m in metering.seen if "Event" in m}
    # The call's own events came through, PREPAID_* variables among them...
    assert {"Newchannel", "Newstate", "DialBegin", "DialEnd", "BridgeEnter", "BridgeLeave",
            "Hangup", "Cdr", "VarSet"} <= arrived
    assert {m["Value"] for m in metering.seen
            if m.get("Event") == "VarSet" and m.get("Variable") == "PREPAID_CALLREF"} == {ref}
    # ... and the call made events the filters dropped: dialplan steps, other variables
    # set on channels that carry PREPAID_* channel variables (the ChanVariable lines that
    # must not match the VarSet filter).
    dropped = [m for m in everything if "Event" in m and not metered(m)]
    assert {"Newexten", "HangupRequest", "NewConnectedLine"} <= {m["Event"] for m in dropped}
    assert any(m.get("Event") == "VarSet" and m.get("Variable") == "LIMIT_WARNING_FILE"
               and m.get("Uniqueid") == ref for m in dropped)
