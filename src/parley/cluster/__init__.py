"""Many parley instances on one Redis (`PARLEY_REDIS_URL`): who is alive, which instance holds each
call's media socket, the shared ACS call book, commands routed to a call's instance, and the
cluster-wide call cap. Without Redis none of this is built (docs/scaling.md, Many instances on Redis)."""

from parley.cluster.node import Cluster, build_cluster

__all__ = ["Cluster", "build_cluster"]
