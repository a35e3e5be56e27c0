"""Database failures name what is wrong, never the credentials in the database URL."""

from __future__ import annotations

import psycopg
import pytest
from threadgate.devstack import free_port
from threadgate.errors import ConfigError
from threadgate.identity import ExecutorClaim

from tests.conftest import Stack, unique

pytestmark = pytest.mark.integration

PASSWORD = "db-pw-Zx81qT"


def with_password(url: str) -> str:
    # The test server trusts local connections: the password is carried, never checked.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


async def test_claim_conflict_names_the_holder_not_the_url(stack: Stack) -> None:
    url = with_password(stack.pg.url("postgres"))
    name = unique("pod")
    first = ExecutorClaim(url, name)
    await first.acquire(5)
    try:
        second = ExecutorClaim(url, name)
        with pytest.raises(ConfigError) as caught:
            await second.acquire(0)
        await second.release()
        err = caught.value
        assert f"threadgate {name}" in err.message  # who holds it: the process label
        for text in (err.message, str(err), repr(err), str(err.body())):
            assert PASSWORD not in text
            assert url not in text
    finally:
        await first.release()


async def test_unreachable_database_error_hides_the_password() -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/x"
    claim = ExecutorClaim(url, unique("pod"))
    with pytest.raises(psycopg.OperationalError) as caught:
        await claim.acquire(0)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    await claim.release()
