"""The console's HTTP test client lives in ``stillhouse.testing.console_client`` (the bench uses it too)."""

from stillhouse.testing.console_client import ConsoleClient

__all__ = ["ConsoleClient"]
