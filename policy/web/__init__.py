"""The "My account" web page of the policy service."""
