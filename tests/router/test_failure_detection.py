"""The router notices a lost instance from its data-plane connection, not from its load poll:
a disaggregated deployment in this process (real engines, NIXL, ZeroMQ on loopback) whose
load poll is set to an hour, so that only the connection can tell."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig, start_local
from cluster.router.settings import RouterSettings
from cluster.router.types import GenerateInput, Unavailable
from tests.helpers import wait_until_async

pytest.importorskip("nixl")

HOUR_S = 3600.0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_closed_connection_marks_the_instance_lost_at_once(tiny_model_dir, role):
    async def main():
        config = DeploymentConfig(model=str(tiny_model_dir), engine={"num_blocks": 128})
        settings = RouterSettings(load_poll_interval_s=HOUR_S, instance_wait_s=1.0)
        router = await start_local(config, settings)
        try:
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            chunks = [c async for c in router.generate(GenerateInput([5, 6, 7], params))]
            assert chunks[-1].finished  # served before the loss
            victim = next(i for i in router.instances if i.role == role)
            victim.client.worker.server.close()  # its socket closes, as when its process dies
            await wait_until_async(lambda: not victim.healthy, 30.0, message="not marked lost")
            assert "disconnected" in victim.lost_reason
            # The next request finds no healthy instance of that role: refused, not hung.
            with pytest.raises(Unavailable, match=f"no healthy {role} instance"):
                async for _ in router.generate(GenerateInput([5, 6, 8], params)):
                    pass
        finally:
            await router.shutdown()

    asyncio.run(main())
