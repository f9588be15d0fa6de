"""Data: DALI pipelines, computed task builders, manifests, in-context assembly, demo data and the
latent cache (see docs/data.md). Names resolve lazily, so importing this package loads no DALI."""

import importlib

_EXPORTS = {
    "COMPUTED_TASKS": "tasks",
    "build_pair": "tasks",
    "build_pairs": "tasks",
    "InContextBatch": "incontext",
    "InContextLoader": "incontext",
    "LoaderConfig": "incontext",
    "build_incontext_loader": "incontext",
    "load_manifest": "manifest",
    "ManifestError": "manifest",
    "KNOWN_TASKS": "manifest",
    "demo_image_paths": "demo_data",
    "demo_clips": "demo_data",
    "write_demo_clips": "demo_data",
    "build_latent_cache": "latent_cache",
    "LatentCacheLoader": "latent_cache",
    "VAECacheEncoder": "latent_cache",
    "DaliFrameDecoder": "pipelines",
    "DaliClipDecoder": "pipelines",
    "build_image_iterator": "pipelines",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
