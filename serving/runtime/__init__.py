"""The Serve runtime: routes, request protocol, access, traffic arms, shard replicas, query encoders, answers."""
