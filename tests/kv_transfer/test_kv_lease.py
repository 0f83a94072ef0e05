"""LeaseTable on a fake clock: every lease ends exactly once, by notification or by expiry
after ttl + grace, and nothing that arrives late resurrects it."""

from __future__ import annotations

import pytest

from cluster.kv_transfer.lease import LeaseTable


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock) -> LeaseTable:
    return LeaseTable(grace_s=1.0, clock=clock)


def test_complete_returns_blocks_once(table):
    table.grant("r", [4, 5, 9], ttl_s=5.0)
    assert "r" in table and len(table) == 1
    assert table.complete("r") == [4, 5, 9]
    assert table.complete("r") is None
    assert "r" not in table
    assert (table.num_granted, table.num_completed, table.num_expired) == (1, 1, 0)
    table.check_integrity()


def test_renew_extends_from_now(table, clock):
    table.grant("r", [1], ttl_s=5.0)
    clock.advance(4.0)
    assert table.renew("r") == 5.0
    clock.advance(4.0 + 1.0 + 0.5)  # past the first expiry + grace, inside the renewed one
    assert table.expire() == []
    assert table.complete("r") == [1]


def test_expire_waits_for_grace_and_returns_once(table, clock):
    table.grant("a", [1], ttl_s=5.0)
    table.grant("b", [2], ttl_s=50.0)
    clock.advance(5.0)
    assert table.renew("a") is None  # lapsed: the puller must give up...
    assert table.expire() == []  # ...but the blocks stay pinned through the grace
    clock.advance(1.0)
    assert table.expire() == ["a"]
    assert table.expire() == []
    assert table.renew("a") is None
    assert (table.num_expired, len(table)) == (1, 1)
    table.check_integrity()


def test_late_notification_after_expiry_is_ignored(table, clock):
    table.grant("r", [7, 8], ttl_s=2.0)
    clock.advance(3.0)
    assert table.expire() == ["r"]
    assert table.complete("r") is None
    assert (table.num_completed, table.num_expired) == (0, 1)
    table.check_integrity()


def test_notification_inside_grace_still_frees(table, clock):
    """The READ finished (NIXL notifies after the data landed) after the puller's view of the
    lease ran out: the puller discards its copy, the holder frees now rather than later."""
    table.grant("r", [3], ttl_s=2.0)
    clock.advance(2.5)
    assert table.complete("r") == [3]
    assert table.expire() == []


def test_unknown_request(table):
    assert table.renew("nope") is None
    assert table.complete("nope") is None
    assert table.expire() == []


def test_grant_rejects_duplicates_and_bad_ttl(table):
    table.grant("r", [1], ttl_s=1.0)
    with pytest.raises(ValueError, match="already holds"):
        table.grant("r", [2], ttl_s=1.0)
    with pytest.raises(ValueError, match="ttl_s"):
        table.grant("s", [2], ttl_s=0.0)
    with pytest.raises(ValueError, match="grace_s"):
        LeaseTable(grace_s=-1.0)


def test_shared_prefix_blocks_may_sit_in_two_leases(table):
    table.grant("a", [1, 2], ttl_s=1.0)
    table.grant("b", [1, 3], ttl_s=1.0)
    table.check_integrity()


def test_puller_view_never_outlives_holder_free(clock):
    """The safety argument of lease.py, played out: the puller reads its clock before the
    renew RPC, the holder handles it later; the puller's view of expiry always ends before
    the holder frees, however long the RPC took each way."""
    holder = LeaseTable(grace_s=0.5, clock=clock)
    holder.grant("r", [1], ttl_s=2.0)
    for rpc_out_s, rpc_back_s in [(0.0, 0.0), (0.3, 0.6), (0.8, 0.1)]:
        t0 = clock()
        clock.advance(rpc_out_s)
        remaining_s = holder.renew("r")
        clock.advance(rpc_back_s)
        view_expiry = t0 + remaining_s
        holder_frees_at = clock() - rpc_back_s + remaining_s + holder.grace_s
        assert view_expiry < holder_frees_at
    clock.advance(2.0 + 0.5)
    assert holder.expire() == ["r"]
