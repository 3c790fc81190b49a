"""The shard fan-out's bookkeeping without a cluster (its behaviour on a real one:
test_ray_shards.py): groups of shards, round robin over the copies that answer, a copy left
out and let back in, and the HTTP form of a shard with no copy."""

from ragserve.errors import ShardUnavailableError
from ragserve.ray.serve.fanout import _Group
from ragserve.ray.serve.shards import groups_of
from ragserve.server.httperrors import describe


def test_shards_are_grouped_in_order_by_shards_per_actor():
    names = [f"shard-00{i}" for i in range(5)]
    assert groups_of(names, 1) == [[n] for n in names]
    assert groups_of(names, 2) == [names[0:2], names[2:4], names[4:5]]


def test_copies_take_turns_and_a_copy_left_out_is_skipped_until_it_is_back():
    g = _Group(["shard-000"], ["a", "b"])
    assert {g.pick(set()) for _ in range(4)} == {0, 1}
    assert g.pick({0}) == 1 and g.pick({0, 1}) is None  # a retry goes to a copy not yet tried
    g.down(0, RuntimeError("died"))
    assert [g.pick(set()) for _ in range(3)] == [1, 1, 1] and g.others_up(1) is False
    g.down(1, RuntimeError("died"))
    assert g.pick(set()) is None  # no copy: the search names the shard as missing
    g.back(0)
    assert g.pick(set()) == 0 and g.others_up(1)


def test_a_shard_with_no_copy_is_a_503_with_retry_after_naming_it():
    e = describe(ShardUnavailableError("/idx", ["shard-001"], "ActorDiedError from copy 0"), "rid", 2)
    assert e.status == 503 and e.headers == {"Retry-After": "2"}
    assert e.type == "ShardUnavailableError" and e.stage == "search" and "shard-001" in e.message
