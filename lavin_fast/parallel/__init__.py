"""Parallelism shared by training, sampling and data building: process groups and the device of each rank
(distributed.py), model wrapping for FSDP2/DDP, and context parallelism (context_parallel.py, with the
Ulysses/ring attention of cp_attention.py). Sits above models and below data, flow and train."""
