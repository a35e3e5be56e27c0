"""THREADGATE_BACKGROUND_POLLING_S: DBOS's pollers of features threadgate does not use (its
internal queue, its background jobs) run at that pace on a launched pod, not every second."""

from __future__ import annotations

import pytest
from dbos import _workflow_commands
from threadgate.workflows.internals import dbos_instance

from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration


async def test_dbos_background_polling_follows_the_setting(pod: Pod) -> None:
    seconds = pod.settings.background_polling_s
    assert seconds == 30.0  # the default, far from DBOS's own 1 s
    internal = dbos_instance()._registry.get_internal_queue()
    assert internal._polling_interval_sec == seconds
    assert seconds == _workflow_commands._BACKGROUND_JOBS_INTERVAL_SEC
