"""The distributed side of swarm-inference: identity, discovery, gossip, election, partitioner,
layer map, data-plane routing, HTTP API and daemon. It imports `peer`, never the reverse, and knows
tensors only as bytes."""
