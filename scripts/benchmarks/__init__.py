"""The benchmark families of `scripts/bench.py`, one module each."""
