"""The throwaway PostgreSQL cluster for tests lives in ``stillhouse.testing.pg`` (the bench uses it too)."""

from stillhouse.testing.pg import PgCluster, find_pg_bin, free_port, skip_reason

__all__ = ["PgCluster", "find_pg_bin", "free_port", "skip_reason"]
