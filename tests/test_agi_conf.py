"""The shipped Asterisk config: asterisklint finds nothing, and it holds what the AGI expects."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parent.parent / "asterisk-conf"
pytest.importorskip("asterisklint", reason="asterisklint belongs in the [test] extras")
LINT = Path(sys.executable).parent / "asterisklint"


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "dialplan-check", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_extensions_conf_has_no_lint_findings() -> None:
    result = lint(CONF / "extensions.conf")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_lint_does_catch_a_broken_dialplan(tmp_path: Path) -> None:
    broken = (CONF / "extensions.conf").read_text().replace("?nocredit)", "?nocredit", 1)
    (tmp_path / "extensions.conf").write_text(broken)
    result = lint(tmp_path / "extensions.conf")
    assert result.returncode != 0 and "extensions.conf:" in result.stdout + result.stderr


def test_dialplan_warns_by_dials_limit_not_by_the_listener() -> None:
    text = (CONF / "extensions.conf").read_text()
    dials = re.findall(r"^ same => n,Dial\((.*)\)$", text, re.M)
    assert dials == ["${PREPAID_DIAL_PREFIX}${EXTEN}${PREPAID_DIAL_SUFFIX},"
                     "${PREPAID_RING_SECONDS},L(${PREPAID_WARNING_LIMIT})"]


def test_dialplan_uses_the_agi_global_and_the_contract_variables() -> None:
    text = (CONF / "extensions.conf").read_text()
    assert re.search(r"^PREPAID_AGI=agi://127\.0\.0\.1:4573$", text, re.M)
    # chan_pjsip dials PJSIP/<number>@<endpoint> ("PJSIP/my-trunk/<number>" is an invalid URI)
    assert re.search(r"^PREPAID_DIAL_PREFIX=PJSIP/$", text, re.M)
    assert re.search(r"^PREPAID_DIAL_SUFFIX=@\S+$", text, re.M)
    agi_calls = re.findall(r"AGI\(([^)]*)\)", text)
    # Every request passes [agi] secret first (issue 11), from [globals].
    assert agi_calls == ["${PREPAID_AGI}/authorize,${PREPAID_AGI_SECRET}",
                         "${PREPAID_AGI}/balance,${PREPAID_AGI_SECRET}",
                         "${PREPAID_AGI}/menu,${PREPAID_AGI_SECRET}"]
    assert re.search(r"^PREPAID_AGI_SECRET=$", text, re.M)
    assert "Set(TIMEOUT(absolute)=${PREPAID_TIMEOUT})" in text
    assert "[prepaid-outbound]" in text and "exten => *100," in text


def test_manager_user_has_least_rights() -> None:
    text = (CONF / "manager.conf").read_text()
    user = text.split("[prepaid]", 1)[1]
    rights = dict(re.findall(r"^(read|write) = (.*)$", user, re.M))
    # No originate: the dialplan plays the credit warning itself (Dial's L()).
    assert set(rights["write"].split(",")) == {"call", "reporting"}
    assert set(rights["read"].split(",")) == {"call", "cdr", "dialplan"}
    assert "system" not in rights["write"] and "config" not in rights["write"]
    assert "permit = 127.0.0.1/255.255.255.255" in user
    assert "deny = 0.0.0.0/0.0.0.0" in user
    assert "channelvars = PREPAID_ACCOUNT,PREPAID_CALLREF" in text


def test_manager_event_filters_use_the_syntax_asterisk_18_and_20_accept() -> None:
    # Asterisk 22's advanced form, eventfilter(action(include),name(X)) =, is unknown to the
    # Asterisk 18 and 20 that FreePBX runs; the legacy form is a regex after "eventfilter =".
    user = (CONF / "manager.conf").read_text().split("[prepaid]", 1)[1]
    filters = re.findall(r"^eventfilter\s*(\S*?)\s*=\s*(.*)$", user, re.M)
    assert filters and all(criteria == "" for criteria, _ in filters), filters
    [names] = [re.fullmatch(r"\^Event: \(([\w|]+)\)\[\[:cntrl:\]\]", f)
               for _, f in filters if "VarSet" not in f]
    assert names is not None
    assert {"Newchannel", "Hangup", "DialBegin", "BridgeEnter", "Cdr"} <= set(
        names.group(1).split("|"))
    assert ("", "^Event: VarSet[[:cntrl:]].*[[:cntrl:]]Variable: PREPAID_") in filters
