"""Elastic pools: an SLO autoscaler in the router's loop (docs/elastic.md).

window.py      what the router saw: arrivals, lengths, TTFT and TPOT per request
controller.py  what to do: pool sizes from the planner's model at the forecast load,
               corrected on an SLO breach, bounded, with hysteresis (pure, scripted tests)
pools.py       how: start, drain and stop instances, flip a role (workers/elastic.py)
hardware.py    mixed pools: the device types each role may run on, their models and prices
autoscaler.py  the loop: observe, decide, act, log, export
"""
