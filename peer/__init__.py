"""The model side of swarm-inference: resources, model store, shard loading, stage execution,
KV cache, sampling and tokenizer. It deals in tensors and token ids and knows nothing about
networking; the `swarm` package wraps it."""

import logging

# transformers imports torchao (installed for --quantize) whenever it builds a layer; torchao then
# reports the optional CUDA kernels it cannot load on this machine, and torch warns of torchao's
# pytree registrations. None of it concerns a peer: keep it out of every log and terminal.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
