"""The model side of swarm-inference: resources, model store, shard loading, stage execution,
KV cache, sampling and tokenizer. It deals in tensors and token ids and knows nothing about
networking; the `swarm` package wraps it."""
