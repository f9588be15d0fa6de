"""In-context sequence assembly: per sample one task, N example pairs of it and a query pair.

    loader = build_incontext_loader("demo", resolution=64, n_pairs=4, batch_size=8, seed=0)
    for batch in loader:          # an endless stream of InContextBatch
        batch.context             # [B, 3, 2N + 1, H, W]: in_1, tgt_1, ..., in_N, tgt_N, query_in
        batch.target              # [B, 3, 1, H, W]: the query's target
        batch.task                # list of B task names (one task per sequence)

Sources: "demo" (the embedded photographs and generated clips), a JSON-lines manifest
(`lavin_fast.data.manifest`), or a directory of images (computed tasks) and clips (frame prediction).

Everything random is decided in Python by a planner seeded with (seed, shard_id, batch index), so a
batch is a pure function of its index: resuming from `state_dict()` reproduces the same batches,
with any backend and any number of DataLoader workers. With `elastic=True` (what the trainer builds) each
sample is keyed by its global index instead and drawn from the whole pools, so any number of ranks shares
one global stream and `seek(samples)` continues it on another number of ranks. The pixels are produced by a backend:
- "dali": NVIDIA DALI decodes, crops, resizes (bicubic, antialiased) and flips
  (`lavin_fast.data.pipelines`), mixed GPU decoding with device="gpu", the CPU operators otherwise;
- "torch": PIL decodes, crops and resizes (bicubic with antialiasing, the same crop windows),
  optionally in DataLoader worker processes; with source "demo" the photographs are held in
  memory, pre-shrunk, for a loader that costs little next to a tiny model on 2 CPU cores.
The computed tasks (`lavin_fast.data.tasks`) then run in torch on the decoded frames' device.

Unreadable or corrupt files are skipped with a warning and counted (`loader.skipped`): the pair
that needed one is replaced by another drawn from a seeded sequence, so the result does not depend
on when the bad file was discovered.

Files (one job each): config.py (LoaderConfig, InContextBatch), sources.py (sources -> task pools),
planner.py (every random decision), decoders.py (torch decoding; the DALI one is data/pipelines.py's
DaliDecoder), batches.py (plan -> InContextBatch), loader.py (the resumable stream). Names resolve lazily,
so importing one submodule does not import the others (nor DALI).
"""

import importlib

_EXPORTS = {
    "IMAGE_EXTENSIONS": "config",
    "VIDEO_EXTENSIONS": "config",
    "InContextBatch": "config",
    "LoaderConfig": "config",
    "ALL_TASKS": "sources",
    "TaskPool": "sources",
    "PairPlan": "planner",
    "SamplePlan": "planner",
    "Planner": "planner",
    "crop_window": "planner",
    "TorchDecoder": "decoders",
    "Unreadable": "decoders",
    "BatchMaker": "batches",
    "InContextLoader": "loader",
    "build_incontext_loader": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
