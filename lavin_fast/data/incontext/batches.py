"""Batch assembly: batch index -> plan -> decoded frames -> computed tasks -> InContextBatch, replacing pairs whose
files turn out unreadable by the planner's seeded substitutes."""

from __future__ import annotations

import torch
from PIL import Image

from lavin_fast.data.incontext.config import InContextBatch, LoaderConfig
from lavin_fast.data.incontext.decoders import TorchDecoder, Unreadable, _ClipReq, _FrameReq
from lavin_fast.data.incontext.planner import PairPlan, Planner, SamplePlan, _rng, _task_key, crop_window
from lavin_fast.data.incontext.sources import _MEM, TaskPool, _Source
from lavin_fast.data.pipelines import DaliDecoder
from lavin_fast.data.tasks import build_pairs


def _image_size(ref: str, src: _Source) -> tuple[int, int]:
    if ref.startswith(_MEM):
        img = src.memory_images[ref]
        return img.height, img.width
    with Image.open(ref) as img:
        return img.height, img.width


class BatchMaker:
    """Turns batch index -> plan -> frames -> InContextBatch; picklable for DataLoader workers
    (the DALI decoder is created lazily in the process that uses it)."""

    def __init__(
        self,
        cfg: LoaderConfig,
        src: _Source,
        pools: dict[str, TaskPool],
        weights: dict[str, float],
        backend: str,
        device: str,
    ):
        self.cfg, self.src, self.pools, self.backend, self.device = cfg, src, pools, backend, device
        self.planner = Planner(pools, weights, cfg)
        self._decoder = None
        self._sizes: dict[str, tuple[int, int]] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_decoder"] = None
        return d

    @property
    def decoder(self):
        if self._decoder is None:
            if self.backend == "dali":
                self._decoder = DaliDecoder(self.cfg, self.src, self.pools, self.device)
            else:
                self._decoder = TorchDecoder(self.cfg, self.src)
        return self._decoder

    def _refs(self, pool: TaskPool, pair: PairPlan) -> list[str]:
        if pool.kind == "computed":
            return [pool.items[pair.item]]
        if pool.kind == "pairs":
            inp, tgt = pool.items[pair.item]
            s, k = pair.start, pool.in_frames
            return list(inp[s : s + k]) + list(tgt[s : s + k])
        return [pool.items[pair.item].ref]

    def _size(self, ref: str, pool: TaskPool, pair: PairPlan) -> tuple[int, int]:
        if pool.kind == "clip":
            c = pool.items[pair.item]
            return c.height, c.width
        if ref not in self._sizes:
            self._sizes[ref] = _image_size(ref, self.src)
        return self._sizes[ref]

    def make(self, index: int, known_bad: set[str] | None = None) -> tuple[InContextBatch, dict[str, str]]:
        """The batch at `index` and the files newly found unreadable while making it."""
        bad: dict[str, str] = {}
        known = set(known_bad or ())
        plans = self.planner.plan(index)
        attempts = [[0] * len(p.pairs) for p in plans]
        for _round in range(64):
            # substitute the pairs that touch a known-bad file (deterministic sequence per slot)
            for i, plan in enumerate(plans):
                pool = self.pools[plan.task]
                for j in range(len(plan.pairs)):
                    while any(r in known or r in bad for r in self._refs(pool, plan.pairs[j])):
                        if attempts[i][j] >= 256:
                            seen = {**dict.fromkeys(known, "unreadable earlier"), **bad}
                            eg = "; ".join(f"{r}: {m}" for r, m in list(seen.items())[:2])
                            raise ValueError(f"task {plan.task!r}: no readable pair in 256 tries, {len(seen)} file(s) "
                                             f"unreadable (e.g. {eg}); check the data")  # fmt: skip
                        plan.pairs[j] = self.planner.replacement(index, i, j, attempts[i][j], plan)
                        attempts[i][j] += 1
            try:
                return self._assemble(index, plans), bad
            except Unreadable as exc:
                bad.update(exc.bad)  # the loader warns once per file when it merges these
        raise RuntimeError(f"batch {index}: could not find readable substitutes after 64 rounds")

    def pair_tensors(self, index: int, plans: list[SamplePlan]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Pixels of every pair of every plan: per plan a list of (input [3, k, H, W], target
        [3, m, H, W]). Raises Unreadable naming the files that could not be read."""
        cfg = self.cfg
        frame_reqs: list[_FrameReq] = []
        clip_reqs: list[_ClipReq] = []
        # where each pair's pixels land: ("f", first frame index, n) or ("c", clip index)
        slots: list[list[tuple]] = []
        unreadable: dict[str, str] = {}
        for plan in plans:
            pool = self.pools[plan.task]
            row = []
            for pair in plan.pairs:
                refs = self._refs(pool, pair)
                try:
                    h, w = self._size(refs[0], pool, pair)
                except Exception as exc:  # the header does not parse: the file is unusable
                    unreadable[refs[0]] = f"{type(exc).__name__}: {exc}"
                    continue
                win = crop_window(h, w, pair.window, cfg)
                if pool.kind == "clip":
                    row.append(("c", len(clip_reqs)))
                    clip_reqs.append(
                        _ClipReq(pool.items[pair.item], pair.start, pool.in_frames + pool.out_frames, win, pair.flip)
                    )
                else:
                    row.append(("f", len(frame_reqs), len(refs)))
                    frame_reqs.extend(_FrameReq(r, win, pair.flip) for r in refs)
            slots.append(row)
        if unreadable:
            raise Unreadable(unreadable)
        dec = self.decoder
        bad: dict[str, str] = {}
        frames = clips = None
        try:
            frames = dec.frames(frame_reqs) if frame_reqs else None
        except Unreadable as exc:
            bad.update(exc.bad)
        try:
            clips = dec.clips(clip_reqs) if clip_reqs else None
        except Unreadable as exc:
            bad.update(exc.bad)
        if bad:
            raise Unreadable(bad)

        # computed tasks: degrade the decoded clean images, batched per task
        # (elastic plans: per sample, keyed by its global index, so a sample's degradations do not depend on which
        # batch, and so which number of ranks, it falls in)
        computed: dict[tuple[str, int | None], list[int]] = {}
        for plan, row in zip(plans, slots, strict=True):
            if self.pools[plan.task].kind == "computed":
                computed.setdefault((plan.task, plan.key), []).extend(s[1] for s in row)
        made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for (task, key), idx in computed.items():
            k = (cfg.seed, cfg.shard_id, index, _task_key(task)) if key is None else (cfg.seed, key, _task_key(task), 7)
            gen = torch.Generator().manual_seed(int(_rng(*k).integers(2**62)))
            inp, tgt = build_pairs(task, frames[idx], gen)
            for n, f in enumerate(idx):
                made[f] = (inp[n], tgt[n])

        rows = []
        for plan, row in zip(plans, slots, strict=True):
            pool = self.pools[plan.task]
            items: list[tuple[torch.Tensor, torch.Tensor]] = []
            for s in row:
                if s[0] == "c":
                    c = clips[s[1]]
                    items.append((c[:, : pool.in_frames], c[:, pool.in_frames :]))
                elif pool.kind == "computed":
                    a, b = made[s[1]]
                    items.append((a[:, None], b[:, None]))
                else:
                    f = frames[s[1] : s[1] + s[2]]
                    k = s[2] // 2
                    items.append((f[:k].permute(1, 0, 2, 3), f[k:].permute(1, 0, 2, 3)))
            rows.append(items)
        return rows

    def _assemble(self, index: int, plans: list[SamplePlan]) -> InContextBatch:
        contexts, targets = [], []
        for items in self.pair_tensors(index, plans):
            ctx = [t for a, b in items[:-1] for t in (a, b)] + [items[-1][0]]
            contexts.append(torch.cat(ctx, 1))
            targets.append(items[-1][1])
        ctx_seg, tgt_seg = self.pools[plans[0].task].signature()
        return InContextBatch(
            context=torch.stack(contexts).contiguous(),
            target=torch.stack(targets).contiguous(),
            task=[p.task for p in plans],
            context_segments=ctx_seg,
            target_segments=tgt_seg,
            index=index,
        )
