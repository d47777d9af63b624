"""``prepaid policy`` and ``prepaid card``: through click, against real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner

from policy.commands import card_group, policy_cmd
from prepaid.config import Settings, parse
from prepaid.ledger import Account
from prepaid.store import open_store

EUR = 1_000_000


@pytest.fixture
def settings(redis_url: str) -> Settings:
    settings = parse({"redis": {"url": redis_url}, "policy": {"max_topup": "100"}}, env={})

    async def seed() -> None:
        st = await open_store(settings)
        await st.ledger.create_account("1001", currency="EUR", email="ann@example.org")
        await st.close()

    asyncio.run(seed())
    return settings


class Obj:
    """Stands for the lead's CLI context object: it carries ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


def cli(settings: Settings, command: Any, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(command, list(args), obj=Obj(settings))
    return result.exit_code, result.output


def account(settings: Settings) -> Account:
    async def get() -> Account:
        st = await open_store(settings)
        try:
            return await st.ledger.get("1001")
        finally:
            await st.close()
    return asyncio.run(get())


def test_topup_is_refused_while_no_card_is_stored(settings: Settings) -> None:
    code, out = cli(settings, policy_cmd, "1001", "--threshold", "5", "--action", "topup",
                    "--amount", "20")
    assert code == 1
    assert "account 1001 has no stored card; store one with 'prepaid card set 1001" in out
    acct = account(settings)
    assert (acct.action, acct.threshold, acct.policy_enabled) == ("none", 0, False)


def test_card_then_topup_policy(settings: Settings) -> None:
    code, out = cli(settings, card_group, "set", "1001", "--token", "tok_ok", "--brand", "visa",
                    "--last4", "4242", "--exp", "12/39")
    assert code == 0 and "card visa ****4242 exp 12/39 stored" in out
    code, out = cli(settings, policy_cmd, "1001", "--threshold", "5", "--action", "topup",
                    "--amount", "20", "--email", "bob@example.org")
    assert code == 0, out
    assert out.strip() == ("1001: below EUR 5.00 -> topup (on), top-up EUR 20.00, e-mail "
                           "bob@example.org, card visa ****4242 exp 12/39")
    acct = account(settings)
    assert (acct.threshold, acct.topup_amount, acct.action, acct.policy_enabled) == (
        5 * EUR, 20 * EUR, "topup", True)
    code, out = cli(settings, policy_cmd, "1001", "--off")
    assert code == 0 and "(off)" in out and not account(settings).policy_enabled
    code, out = cli(settings, card_group, "remove", "1001")
    assert "switched from topup to email" in out
    assert (account(settings).action, account(settings).has_card) == ("email", False)


@pytest.mark.parametrize(("args", "message"), [
    (("--threshold", "5.001"), "--threshold '5.001' has 3 decimals; at most 2 allowed"),
    (("--threshold", "-1"), "--threshold '-1' is negative"),
    (("--action", "email", "--email", "nobody"), "--email 'nobody' is not an e-mail address"),
    (("--action", "email"), "give a --threshold above zero for action email"),
])
def test_bad_policy_input_is_one_clear_error_and_changes_nothing(
        settings: Settings, args: tuple[str, ...], message: str) -> None:
    code, out = cli(settings, policy_cmd, "1001", *args)
    assert code == 1 and message in out
    assert account(settings).action == "none" and account(settings).threshold == 0


def test_amount_above_the_maximum_is_refused(settings: Settings) -> None:
    cli(settings, card_group, "set", "1001", "--token", "tok_ok", "--brand", "visa", "--last4",
        "4242", "--exp", "12/39")
    code, out = cli(settings, policy_cmd, "1001", "--threshold", "5", "--action", "topup",
                    "--amount", "150")
    assert code == 1 and "above the maximum top-up of EUR 100.00" in out


def test_a_card_number_is_never_stored(settings: Settings) -> None:
    code, out = cli(settings, card_group, "set", "1001", "--token", "4242424242424242",
                    "--brand", "visa", "--last4", "4242", "--exp", "12/39")
    assert code == 1 and "card token looks like a full card number" in out
    assert not account(settings).has_card
    code, out = cli(settings, card_group, "show", "1001")
    assert out.strip() == "1001: no card stored"


def test_policy_and_card_as_json_never_show_the_token(settings: Settings) -> None:
    cli(settings, card_group, "set", "1001", "--token", "tok_ok", "--brand", "visa",
        "--last4", "4242", "--exp", "12/39")
    cli(settings, policy_cmd, "1001", "--threshold", "5", "--action", "email",
        "--email", "bob@example.org")
    code, out = cli(settings, policy_cmd, "1001", "--json")
    assert code == 0, out
    assert json.loads(out) == {"account": "1001", "email": "bob@example.org", "policy": {
        "enabled": True, "action": "email", "threshold": "5.00", "topup_amount": "0.00"}}
    code, out = cli(settings, card_group, "show", "1001", "--json")
    assert json.loads(out)["card"] == {"brand": "visa", "last4": "4242", "exp": "12/39"}
    assert "tok_ok" not in out
