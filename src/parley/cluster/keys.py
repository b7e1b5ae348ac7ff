"""The Redis keys and channels of the cluster, all under `parley:` (the Lua scripts spell the same
names: parley.cluster.scripts)."""

from __future__ import annotations

INSTANCES = "parley:instances"  # set: the instances that announced themselves (alive or not yet cleaned up)
LIVE_CALLS = "parley:live"  # set: the live calls of the whole cluster (the cluster cap counts it)


def heartbeat(instance: str) -> str:
    """String with a TTL: the instance is alive while it exists."""
    return f"parley:instance:{instance}"


def instance_calls(instance: str) -> str:
    """Set: the ids (call ids and their ACS keys) an instance holds, for whoever cleans up after it."""
    return f"parley:instance:{instance}:calls"


def owner(call_id: str) -> str:
    """String with a TTL: the instance holding the call's media socket."""
    return f"parley:owner:{call_id}"


def recent(call_id: str) -> str:
    """String, short TTL: the instance where the call ended (late callbacks still reach its log)."""
    return f"parley:recent:{call_id}"


def early(call_id: str) -> str:
    """List: callbacks that came before any media socket, taken by the instance that gets it."""
    return f"parley:early:{call_id}"


def acs_call(key: str) -> str:
    """Hash: one call of the shared ACS call book."""
    return f"parley:acs:{key}"


def acs_connection(connection_id: str) -> str:
    """String: our key of the call with this ACS call connection id."""
    return f"parley:acs-connection:{connection_id}"


def reaping(instance: str) -> str:
    """Lock (SET NX): the survivor cleaning up after a dead instance."""
    return f"parley:reaping:{instance}"


def channel(instance: str) -> str:
    """Pub/sub channel of an instance: commands for its calls, and replies to its requests."""
    return f"parley:commands:{instance}"
