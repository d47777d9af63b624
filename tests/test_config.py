from __future__ import annotations

from pathlib import Path

import pytest

from prepaid.config import load, parse
from prepaid.errors import ConfigError

SAMPLE = Path(__file__).parent.parent / "asterisk-conf" / "prepaid.toml"


def test_sample_config_is_valid() -> None:
    s = load(SAMPLE, env={})
    assert s.billing.currency == "EUR"
    assert s.agi.port == 4573
    assert s.policy.presets == (5_000_000, 10_000_000, 20_000_000, 50_000_000)


def test_defaults_without_a_file() -> None:
    s = load(None, env={})
    assert s.redis.url.startswith("redis://") and s.policy.action == "none"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[redis]\nurl = 'redis://x'\nhostt = 'a'\n")
    with pytest.raises(ConfigError, match=f"{f}: unknown key \\[redis\\] hostt"):
        load(f, env={})


@pytest.mark.parametrize(("data", "message"), [
    ({"nope": {}}, "unknown section [nope]"),
    ({"billing": {"currency": "euro"}}, "[billing] currency"),
    ({"ami": {"port": "5038"}}, "[ami] port must be a whole number"),
    ({"agi": {"fail_open": "yes"}}, "[agi] fail_open must be true or false"),
    ({"agi": {"listen": "localhost"}}, "[agi] listen 'localhost' must be HOST:PORT"),
    ({"policy": {"action": "sms"}}, "[policy] action 'sms'"),
    ({"policy": {"threshold": "-1"}}, "[policy] threshold '-1' is negative"),
    ({"payments": {"gateway": "paypal"}}, "[payments] gateway 'paypal'"),
    ({"redis": {"url": "http://x"}}, "[redis] url"),
    ({"web": {"listen": "0.0.0.0:8443"}}, "[web] listen '0.0.0.0:8443' is not loopback, so "
                                          "the page must be HTTPS"),
    ({"web": {"listen": "8080"}}, "[web] listen '8080' must be HOST:PORT"),
    ({"web": {"cert": "/x.pem"}}, "[web] cert and key go together"),
    ({"web": {"listen": "127.0.0.1:8080", "public_url": "pbx.example.org"}},
     "[web] public_url 'pbx.example.org' must be a URL"),
    ({"web": {"listen": "127.0.0.1:8080", "support_email": "a b@x"}}, "[web] support_email"),
    ({"web": {"proxy": "yes"}}, "[web] proxy must be true or false"),
])
def test_bad_values_are_named(data: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data, "conf.toml", env={})
    assert message in str(err.value) and str(err.value).startswith("conf.toml: ")


def test_web_over_https_on_any_address_and_its_secret_from_the_environment() -> None:
    s = parse({"web": {"listen": "0.0.0.0:8443", "cert": "/etc/c.pem", "key": "/etc/k.pem"}},
              "/etc/p.toml", env={"PREPAID_WEB_SECRET": "s3cret",
                                  "STRIPE_WEBHOOK_SECRET": "whsec_1"})
    assert (s.web.https, s.web.host, s.web.port, s.web.secret) == (True, "0.0.0.0", 8443,
                                                                  "s3cret")
    assert s.payments.stripe_webhook_secret == "whsec_1"
    assert "s3cret" not in repr(s) and "whsec_1" not in repr(s)
    assert parse({}, env={}).web.listen == ""  # off unless asked for


def test_not_toml(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[redis\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(f, env={})


def test_secrets_from_the_environment_and_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[ami]\nsecret = 'in-file'\n[billing]\nrates = 'rates.csv'\n"
                 "[smtp]\nfrom = 'billing@example.org'\n")
    f.chmod(0o600)
    s = load(f, env={"PREPAID_AMI_SECRET": "from-env",
                     "PREPAID_REDIS_URL": "redis://:pw@127.0.0.1:1/0"})
    assert s.ami.secret == "from-env"
    assert s.billing.rates == tmp_path / "rates.csv"
    assert s.smtp.sender == "billing@example.org"
    assert s.redis.safe_url == "redis://:***@127.0.0.1:1/0"


def test_config_from_env_variable(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[billing]\ncurrency = 'USD'\n")
    assert load(None, env={"PREPAID_CONFIG": str(f)}).billing.currency == "USD"


def test_world_readable_file_with_secrets_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[ami]\nsecret = 's3cret'\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load(f, env={})
    assert "[ami] secret" in str(err.value) and "s3cret" not in str(err.value)
    assert "chmod 640" in str(err.value) and "PREPAID_AMI_SECRET" in str(err.value)
    f.chmod(0o640)
    assert load(f, env={}).ami.secret == "s3cret"
    f.write_text("[redis]\nurl = 'redis://127.0.0.1:6379/0'\n")
    f.chmod(0o644)
    assert load(f, env={}).redis.url.endswith("/0")  # no password in it: fine
