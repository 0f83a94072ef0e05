"""The autoscaler: every interval_s it observes the router's window, decides (controller.py)
and acts (pools.py); each decision that changes anything is logged with its reasons, and
counted in /metrics:

    pdcluster:pool_instances{role}            routed-to instances (router/metrics.py)
    pdcluster:pool_instances_draining{role}   being drained
    pdcluster:autoscale_actions{action,role,cause}
    pdcluster:pool_gpus                       devices held now, starting and draining too
    pdcluster:gpu_seconds                     device-seconds held since start
    pdcluster:pool_gpus_by_hardware{hardware}     ... by device type
    pdcluster:gpu_seconds_by_hardware{hardware}
    pdcluster:pool_cost_per_hour              $/hour of the devices held now (known prices)
    pdcluster:pool_cost_seconds               $/hour integrated over seconds (/3600: dollars)

The model it sizes with: the emulated hardware's latency model for an emulated cluster (the
one the emulated instances step at: predictions and emulation agree), a fitted profile
(`autoscale.profile`, from `placement profile`) for real engines, or none: then it scales
on SLO breaches and slack alone. With `autoscale.hardware` (mixed pools, elastic/hardware.py)
it sizes every pair of allowed types and the controller keeps the cheapest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster.background import spawn
from cluster.elastic.controller import ROLES, Action, Controller, Decision, TypedSizes
from cluster.elastic.hardware import PoolHardware, pool_hardware
from cluster.elastic.pools import ElasticPools
from cluster.elastic.settings import AutoscaleSettings
from cluster.placement import sizing
from cluster.placement.model_spec import load_model_spec
from cluster.router.router import Router

logger = logging.getLogger(__name__)
_RECENT_INTERVALS = 3  # attainment, the rate and the prompts arriving: over this many
_RATE_ARRIVALS = 100  # ... and the rate over at least this many arrivals (±10 % Poisson noise)


class Autoscaler:
    def __init__(self, router: Router, pools: ElasticPools, controller: Controller,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.router, self.pools, self.controller = router, pools, controller
        self.settings = controller.settings
        self.clock = clock
        self.decisions: list[Decision] = []  # those that acted (the last 1000)
        self._tasks: set[asyncio.Future] = set()
        self._loop: asyncio.Future | None = None
        self._start = clock()
        self._collector = _Collector(pools)
        router.metrics.registry.register(self._collector)

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop deciding; actions under way are cancelled (a drain: the instance serves on)."""
        self.router.metrics.registry.unregister(self._collector)
        for task in (self._loop, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._loop, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - one bad decision must not stop the loop
                logger.exception("autoscaler: the decision failed")

    async def step(self) -> Decision:
        """One decision, its actions started (they run on: a drain takes its time). The
        model's sizing (tens of ms) runs on a thread, off the router's event loop."""
        now, s = self.clock(), self.settings
        window = self.router.window
        span = min(_RECENT_INTERVALS * s.interval_s, now - self._start)
        late = s.ttft_s * self.controller.time_scale
        recent = window.observe(now - span, now, late_after_s=late)
        history = window.observe(now - s.history_s, now)
        rate = window.rate(now, span, _RATE_ARRIVALS)
        decision = await asyncio.to_thread(
            self.controller.decide,
            recent,
            rate,
            history,
            self.pools.counts(),
            dict(self.pools.starting),
            self.pools.counts_by_type(),
            {role: dict(c) for role, c in self.pools.starting_by_type.items()},
        )
        if decision.actions:
            self.decisions = [*self.decisions[-999:], decision]
            logger.warning(
                "autoscale: %s -> %s%s (%s): %s", _pools(decision.current),
                _pools(decision.target), _types(decision.hardware),
                ", ".join(_action(a) for a in decision.actions), decision.reason,
            )  # fmt: skip
        for action in decision.actions:
            task = spawn(self._act(action))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return decision

    async def _act(self, action: Action) -> None:
        pools = self.pools
        run = {"add": pools.add, "remove": pools.remove, "flip": pools.flip}[action.kind]
        self.router.metrics.scaled(action.kind, action.role, action.cause)
        try:
            await run(action.role, hardware=action.hardware)
        except ValueError as e:  # refused (the last of a role, an instance that cannot flip)
            logger.warning("autoscale: %s refused: %s", _action(action), e)
        except Exception:  # noqa: BLE001 - a failed start or drain: the next decision retries
            logger.exception("autoscale: %s failed", _action(action))


def _pools(counts: dict[str, int]) -> str:
    return " + ".join(f"{counts[r]} {r}" for r in ROLES)


def _types(hardware: dict[str, str] | None) -> str:
    if hardware is None:
        return ""
    return " [" + ", ".join(f"{r} on {hardware[r]}" for r in ROLES) + "]"


def _action(action: Action) -> str:
    on = "" if action.hardware is None else f" on {action.hardware}"
    return f"{action.kind} {action.role}{on} ({action.cause})"


class _Collector:
    def __init__(self, pools: ElasticPools):
        self.pools = pools

    def collect(self):
        gpus = GaugeMetricFamily(
            "pdcluster:pool_gpus", "Devices the pools hold now, starting and draining included."
        )
        gpus.add_metric([], self.pools.devices)
        seconds = CounterMetricFamily(
            "pdcluster:gpu_seconds", "Device-seconds the pools held since the router started."
        )
        seconds.add_metric([], self.pools.device_seconds)
        yield gpus
        yield seconds
        yield from self._by_type()
        if self.pools.cost_known:
            cost = GaugeMetricFamily(
                "pdcluster:pool_cost_per_hour",
                "$/hour of the devices the pools hold now (the catalog's or profiles' prices).",
            )
            cost.add_metric([], self.pools.cost_per_hour)
            spent = CounterMetricFamily(
                "pdcluster:pool_cost_seconds",
                "The pools' $/hour integrated over seconds since the router started: /3600 "
                "for dollars.",
            )
            spent.add_metric([], self.pools.cost_seconds)
            yield cost
            yield spent

    def _by_type(self):
        gpus = GaugeMetricFamily("pdcluster:pool_gpus_by_hardware",
                                 "Devices the pools hold now, by device type.",
                                 labels=["hardware"])  # fmt: skip
        for kind, n in sorted(self.pools.devices_by_type().items(), key=str):
            gpus.add_metric([_label(kind)], n)
        seconds = CounterMetricFamily("pdcluster:gpu_seconds_by_hardware",
                                      "Device-seconds the pools held, by device type.",
                                      labels=["hardware"])  # fmt: skip
        for kind, s in sorted(self.pools.device_seconds_by_type().items(), key=str):
            seconds.add_metric([_label(kind)], s)
        yield gpus
        yield seconds


def _label(kind: str | None) -> str:
    return "" if kind is None else kind


# -- built from a deployment config --------------------------------------------------------


def start_autoscaler(router: Router, config) -> Autoscaler:
    """The autoscaler of a served deployment (`autoscale:` in its config), started."""
    settings: AutoscaleSettings = config.autoscale
    if config.mode != "disaggregated":
        raise ValueError("autoscale sizes a disaggregated deployment's prefill and decode pools")
    if router.launcher is None:
        raise ValueError("autoscale needs a router whose instances it can start and stop")
    shapes = {role: _shape(config, role) for role in ROLES}
    gpus = {role: tp * pp for role, (tp, pp, _) in shapes.items()}
    time_scale = shapes["prefill"][2]
    kinds = pool_hardware(config)
    pools = ElasticPools(router, router.launcher, gpus, settings.drain_timeout_s,
                         hardware={r: kinds.default(r) for r in ROLES},
                         prices=kinds.prices)  # fmt: skip
    controller = Controller(settings, gpus, _sizer(config, settings, kinds), time_scale,
                            can_flip=config.flips_roles(),
                            hardware=kinds.allowed if kinds.is_mixed else None)  # fmt: skip
    autoscaler = Autoscaler(router, pools, controller)
    autoscaler.start()
    return autoscaler


def _shape(config, role: str) -> tuple[int, int, float]:
    """(TP, PP, time scale) of one pool's instances."""
    engine = config.engine_config(role)
    if engine.emulation is not None:
        e = engine.emulation
        return e.tp, e.pp, e.time_scale
    return engine.tensor_parallel_size, engine.pipeline_parallel_size, 1.0


def _sizer(config, settings: AutoscaleSettings, kinds: PoolHardware) -> Callable | None:
    """(rate, input lengths, output lengths) -> pool sizes: the emulated hardware's model,
    or a fitted profile's; None without either. Mixed pools: (..., hardware=None) ->
    TypedSizes, on the pair asked for, else the cheapest pair meeting the SLOs."""
    if kinds.kinds is None:
        return None
    emulation = config.engine_config("decode").emulation
    transfer_s_per_token = 0.0
    if emulation is not None and emulation.kv_bandwidth:  # the decode's pulls
        transfer_s_per_token = load_model_spec(emulation.model).kv_bytes_per_token / (
            emulation.kv_bandwidth
        )
    options = {"attainment": settings.attainment, "max_instances": max(1, settings.max_gpus),
               "transfer_s_per_token": transfer_s_per_token}  # fmt: skip
    slo = (settings.ttft_s, settings.tpot_s)
    by_role = kinds.kinds

    def size(rate, input_lens, output_lens, hardware: dict[str, str] | None = None):
        window = sizing.LoadWindow(rate, input_lens, output_lens)
        if not kinds.is_mixed:
            first = {r: next(iter(by_role[r].values())) for r in ROLES}
            return sizing.size_pools(window, first["prefill"], first["decode"], *slo, **options)
        if hardware is None:
            sizes = sizing.choose_types(window, list(by_role["prefill"].values()),
                                        list(by_role["decode"].values()), *slo,
                                        **options)  # fmt: skip
        else:
            sizes = sizing.size_pools(window, by_role["prefill"][hardware["prefill"]],
                                      by_role["decode"][hardware["decode"]], *slo,
                                      **options)  # fmt: skip
        named = {r: next(n for n, k in by_role[r].items() if k is getattr(sizes, f"{r}_type"))
                 for r in ROLES}  # fmt: skip
        return TypedSizes(sizes.num_prefill, sizes.num_decode, named, sizes.meets_target)

    return size
