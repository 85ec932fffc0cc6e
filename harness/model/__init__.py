"""The network: DiT in one file (dit), its maximal-update parametrization (mup), and its cost in Gflops and
parameters as the paper counts them (flops)."""
