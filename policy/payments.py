"""The gateway ``[payments] gateway`` names: the sandbox (policy/gateway.py) or Stripe
(policy/stripe_gateway.py). Apart from both, so that neither imports the other."""

from __future__ import annotations

from policy.gateway import Gateway, SandboxGateway
from policy.stripe_gateway import StripeGateway
from prepaid.config import Settings
from prepaid.errors import ConfigError
from prepaid.redis_client import RedisClient


def make_gateway(settings: Settings, client: RedisClient) -> Gateway:
    """The gateway ``[payments] gateway`` names."""
    if settings.payments.gateway == "stripe":
        if not settings.payments.stripe_api_key:
            raise ConfigError(f"{settings.source}: [payments] gateway is \"stripe\" but no "
                              "stripe_api_key (or STRIPE_API_KEY) is set")
        return StripeGateway(settings.payments.stripe_api_key,
                             api_base=settings.payments.stripe_api_base)
    return SandboxGateway(client, settings.redis.key_prefix)
