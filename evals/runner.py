"""The evaluation runner: ``veridical eval {pope,chair,mme}``, resumable and shardable.

Contract:
- A benchmark turns ``--data`` into :class:`Item` s (a unique id, an image, a prompt, metadata),
  and scores the samples with the reference-exact scorers of ``pope``, ``chair`` and ``mme``.
- ``OUTPUT/samples.jsonl`` gets one line per item (id, prompt, raw output, parsed answer, ...),
  appended and flushed batch by batch. Rerunning the same command resumes: finished items are
  skipped, a line cut by a crash is dropped, so a crash loses at most the batch in flight and no
  item is ever written twice. A rerun with different settings into the same folder is refused.
- ``OUTPUT/results.json`` holds ``"metrics"`` (POPE: accuracy, precision, recall, f1, yes_ratio,
  and ``per_split``; CHAIR: chair_s, chair_i, recall, length; MME: one key per subtask plus
  perception, cognition, hallucination) and ``"run"``: everything needed to reproduce it (data
  file hashes, image ids, prompt and suffix, decoding settings, seed, batch size, parser,
  package versions, git commit). ``OUTPUT/run.json`` holds the settings as the run started.
- Several processes (``accelerate launch --multi_gpu --num_processes N -m veridical eval ...``;
  on a CPU-only machine too, where the flag only selects the multi-process launcher) take items
  ``rank::world``,
  write ``samples.rank{r}.jsonl``, and rank 0 merges them in item order into ``samples.jsonl``
  and scores; since a request's output does not depend on its batch, the merged results equal a
  single-process run exactly.
- ``builtin:synthcoco`` (``--data``) is the SynthCOCO world's test split, generated on first use
  into the cache folder (``$VERIDICAL_CACHE``, default ``~/.cache/veridical``) by
  ``veridical.world.builtin_world``; a folder with a SynthCOCO ``manifest.json`` is used the same
  way (``--world-split`` picks its split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from veridical import InputError, derive_seed
from veridical.provenance import git_commit, versions

logger = logging.getLogger(__name__)

POPE_SUFFIX = " Please answer this question with one word."
CHAIR_PROMPT = "Please describe this image in detail."


@dataclass
class Item:
    """One evaluation request."""

    id: str
    image: Callable[[], Any]  # returns a path, bytes or PIL image; called when the batch runs
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    """Items plus how to parse and score them, and what to record about the data."""

    name: str
    items: list[Item]
    parse: Callable[[str], str]
    score: Callable[[list[dict]], dict[str, Any]]
    data: dict[str, Any]  # files + sha256, image ids, prompt and suffix, parser ...
    max_new_tokens: int


@dataclass
class EvalConfig:
    """One evaluation run: which benchmark on which data, where to write, how to decode.

    ``data`` is a question/annotation file or folder, or a SynthCOCO world folder (the command
    line and ``veridical.evaluate`` also take ``builtin:synthcoco`` and resolve it to the
    built-in world's folder first). Benchmark options apply where they make sense: POPE
    ``parser`` and ``prompt_suffix``; CHAIR ``num_images``, ``image_seed``, ``image_ids``,
    ``prompt``, ``drop_incomplete_sentence``, ``no_double_space_quirk``; ``split`` (POPE splits
    or MME subtasks, comma-separated)."""

    benchmark: str  # "pope", "chair" or "mme"
    model: str
    data: str
    output: str
    images: str | None = None
    split: str | None = None
    world_split: str = "test"
    limit: int | None = None  # items per split (POPE) / subtask (MME) / in all (CHAIR)
    batch_size: int = 8
    device: str | None = None
    backend: str = "transformers"  # or "vllm" (veridical.load's backend)
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vLLM engine arguments
    skip_bad_lines: bool = False
    method: str = "none"
    method_args: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None  # None: the benchmark's own (POPE 16, CHAIR 64, MME 8)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    seed: int | None = None  # the run seed (0 when None): items derive theirs from it
    parser: str | None = None
    prompt_suffix: str | None = None
    num_images: int | None = None
    image_seed: int = 0
    image_ids: str | None = None
    prompt: str | None = None
    drop_incomplete_sentence: bool = False
    no_double_space_quirk: bool = False
    singularizer: str = "pattern"  # CHAIR's singular forms (evals/chair.py)


# ------------------------------------------------------------------------------------------ data


def resolve_data(data: str, world_split: str) -> tuple[Path, bool]:
    """``data`` -> (path, is a SynthCOCO world folder)."""
    if data.startswith("builtin:"):
        raise InputError(f"{data!r} is a built-in data set: give its folder (the command line "
                         "and veridical.evaluate resolve builtin:synthcoco for you)")
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"--data {data!r} does not exist; give a file, a folder or builtin:synthcoco")
    return path, (path / "manifest.json").is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_file(folder: Path, name: str) -> Callable[[], Path]:
    path = folder / name
    return lambda: path  # veridical.images.load_image names a missing file clearly


def _splits_arg(split: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if not split:
        return list(allowed)
    chosen = [s.strip() for s in split.split(",") if s.strip()]
    bad = [s for s in chosen if s not in allowed]
    if bad:
        raise InputError(f"--split {','.join(bad)} is not a {what}; use one of {', '.join(allowed)}")
    return chosen


def pope_benchmark(args: EvalConfig) -> Benchmark:
    from . import pope

    splits = _splits_arg(args.split, ("random", "popular", "adversarial"), "POPE split")
    path, is_world = resolve_data(args.data, args.world_split)
    images_dir = Path(args.images) if args.images else None
    if is_world:
        files = [path / "pope" / args.world_split / f"coco_pope_{s}.json" for s in splits]
        images_dir = images_dir or path / "images" / args.world_split
    elif path.is_dir() and not list(path.glob("*.parquet")):
        files = [f for s in splits for f in sorted(path.rglob(f"*pope_{s}.json*"))]
        if not files:
            raise InputError(f"{path} has no coco_pope_{{{','.join(splits)}}}.json files; point "
                             "--data at the POPE question files or their folder")
    else:
        files = [path]
    suffix = POPE_SUFFIX if args.prompt_suffix is None else args.prompt_suffix
    items, recorded = [], []
    for file in files:
        parquet = file.suffix == ".parquet" or file.is_dir()
        loaded = (pope.load_parquet_questions(file) if parquet
                  else pope.load_questions(file, skip_bad_lines=args.skip_bad_lines))
        recorded.append({"path": str(file), "sha256": sha256(file) if file.is_file() else None,
                         "skipped_lines": loaded.skipped})
        for rec in loaded.records:
            split = rec.get("category") or rec.get("split") or pope.split_from_filename(file)
            if split not in splits:
                continue
            if parquet:
                image = partial(loaded.image_bytes, rec)
            else:
                if images_dir is None:
                    raise InputError(f"{file} names image files ({rec['image']!r}); pass --images "
                                     "DIR, the folder that holds them (e.g. COCO val2014)")
                image = _image_file(images_dir, rec["image"])
            items.append(Item(f"{split}/{rec['question_id']}", image, rec["text"] + suffix,
                              {"question_id": rec["question_id"], "split": split,
                               "label": rec["label"], "image": rec.get("image")}))
    parser = args.parser or "pope"
    pope.get_parser(parser)

    def score(samples: list[dict]) -> dict[str, Any]:
        preds = {s["id"]: s["answer"] for s in samples}
        per_split: dict[str, Any] = {}
        for split in splits:
            chosen = [it for it in items if it.meta["split"] == split and it.id in preds]
            if chosen:
                per_split[split] = pope.pope_metrics([preds[it.id] for it in chosen],
                                                     [it.meta["label"] for it in chosen])
        pooled = [it for it in items if it.id in preds]
        overall = pope.pope_metrics([preds[it.id] for it in pooled],
                                    [it.meta["label"] for it in pooled])
        return {**overall, "per_split": per_split}

    return Benchmark("pope", items, lambda text: pope.parse_answer(text, parser), score,
                     {"files": recorded, "images": str(images_dir) if images_dir else None,
                      "prompt_suffix": suffix, "parser": parser, "splits": splits},
                     max_new_tokens=args.max_new_tokens or 16)


def chair_benchmark(args: EvalConfig) -> Benchmark:
    from . import chair

    if args.split:
        raise InputError("--split does not apply to CHAIR; choose images with --num-images/--seed "
                         "or --image-ids")
    path, is_world = resolve_data(args.data, args.world_split)
    annotations = path / "annotations" if is_world else path
    images_dir = Path(args.images) if args.images else (
        path / "images" / args.world_split if is_world else None)
    if images_dir is None:
        raise InputError("pass --images DIR, the folder with the images (e.g. COCO val2014)")
    splits = (args.world_split,) if is_world else chair.DEFAULT_SPLITS
    pairs = chair.annotation_files(annotations, splits)
    inst_path = pairs[0][0]
    instances = json.loads(inst_path.read_text())
    names = {im["id"]: im["file_name"] for im in instances["images"]}
    wanted = chair.read_image_ids(args.image_ids) if args.image_ids else None
    ids = chair.select_image_ids(names, args.num_images or min(500, len(names)), args.image_seed,
                                 wanted)
    vocab = chair.load_vocabulary(double_space_quirk=not args.no_double_space_quirk)
    chair.get_singularizer(args.singularizer)  # an unknown name fails before any generation
    prompt = args.prompt or CHAIR_PROMPT
    items = [Item(str(i), _image_file(images_dir, names[i]), prompt, {"image_id": i}) for i in ids]

    def score(samples: list[dict]) -> dict[str, Any]:
        gt, _ = chair.load_ground_truth(annotations, ids, vocab=vocab, splits=splits,
                                        singularizer=args.singularizer)
        caps = [{"image_id": s["meta"]["image_id"], "caption": s["output"]} for s in samples]
        result = chair.score(caps, gt, vocab=vocab, drop_incomplete=args.drop_incomplete_sentence,
                             singularizer=args.singularizer)
        m = result["metrics"]
        return {"chair_s": m["chair_s"], "chair_i": m["chair_i"], "recall": m["recall"],
                "length": m["length"], "per_caption": result["captions"],
                "settings": result["settings"]}

    files = [{"path": str(p), "sha256": sha256(p)} for pair in pairs for p in pair]
    return Benchmark("chair", items, lambda text: text, score,
                     {"files": files, "images": str(images_dir), "image_ids": ids,
                      "image_seed": args.image_seed, "prompt": prompt,
                      "drop_incomplete_sentence": args.drop_incomplete_sentence,
                      "double_space_quirk": not args.no_double_space_quirk,
                      # recorded when not the default (earlier runs' records stay as they were)
                      **({"singularizer": args.singularizer}
                         if args.singularizer != "pattern" else {})},
                     max_new_tokens=args.max_new_tokens or 64)


def mme_benchmark(args: EvalConfig) -> Benchmark:
    from . import mme

    path, is_world = resolve_data(args.data, args.world_split)
    if is_world:
        path = path / "mme"
    subtasks = None
    if args.split:
        subtasks = [s.strip() for s in args.split.split(",") if s.strip()]
    elif is_world:
        subtasks = sorted(p.name for p in path.iterdir() if p.is_dir())
    if path.suffix == ".parquet" or list(path.glob("*.parquet")):
        loaded = mme.load_parquet(path, subtasks)
    else:
        loaded = mme.load_folder(path, subtasks, skip_missing_images=args.skip_bad_lines)
    items = []
    for n, rec in enumerate(loaded.records):
        image = (partial(Path, rec["image_path"]) if "image_path" in rec
                 else partial(loaded.image_bytes, rec))
        items.append(Item(f"{rec['question_id']}#{n}", image, rec["question"],
                          {k: rec[k] for k in ("subtask", "image", "question", "answer")}))

    def score(samples: list[dict]) -> dict[str, Any]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            records = [{**s["meta"], "response": s["output"]} for s in samples]
            mme.write_results(records, tmp)
            result = mme.score_results_dir(tmp, sorted({r["subtask"] for r in records}))
        out = {name: v["score"] for name, v in result["subtasks"].items()}
        out.update({k: result[k] for k in ("perception", "cognition", "hallucination")})
        out["per_subtask"] = result["subtasks"]
        return out

    return Benchmark("mme", items, mme.parse_response, score,
                     {"path": str(path), "subtasks": subtasks, "questions": len(items),
                      "skipped": loaded.skipped, "parser": "mme calculation.py"},
                     max_new_tokens=args.max_new_tokens or 8)


BENCHMARKS = {"pope": pope_benchmark, "chair": chair_benchmark, "mme": mme_benchmark}


# ------------------------------------------------------------------------------------ samples


class SampleLog:
    """``samples.jsonl`` (or a rank's shard) with crash-safe resume."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            self._recover()

    def _recover(self) -> None:
        raw = self.path.read_bytes()
        keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
        if len(keep) != len(raw):
            logger.warning("%s: dropping a line cut by an interrupted run", self.path)
            self.path.write_bytes(keep)
        for n, line in enumerate(keep.decode("utf-8").splitlines(), start=1):
            try:
                sample = json.loads(line)
                self.done[sample["id"]] = sample
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{self.path}, line {n}: not a sample line; the folder holds "
                                 "other data: use a new --output folder") from None

    def append(self, samples: Iterable[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
                self.done[s["id"]] = s
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ running


def run_settings(args: EvalConfig, bench: Benchmark) -> dict[str, Any]:
    """What determines the samples; a resumed run must match it exactly."""
    return {
        "benchmark": bench.name,
        "model": args.model,
        "method": args.method,
        "method_args": dict(args.method_args),
        "data": {k: v for k, v in bench.data.items() if k != "image_ids"},
        "decoding": {
            "max_new_tokens": bench.max_new_tokens, "do_sample": args.do_sample,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "num_beams": args.num_beams, "seed": run_seed(args),
        },
        "limit": args.limit,
    }


def run_seed(args: EvalConfig) -> int:
    """The run's seed; item ``id`` runs with ``derive_seed(run_seed, "item", id)``."""
    return 0 if args.seed is None else args.seed


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, accelerate state or None) when launched by accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # Without GPUs accelerate only joins the processes (gloo) when told to use the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def evaluate(engine: Any, args: EvalConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) one evaluation and write samples.jsonl and results.json; return the
    results. ``engine``: a loaded ``args.model`` (a ``veridical.Backend``), or None to load it
    here (one per process under accelerate); ``quiet``: no table at the end."""
    import veridical

    bench = BENCHMARKS[args.benchmark](args)
    items = limit_items(bench.items, args.limit)
    if not items:
        raise InputError(f"no {bench.name} items to run in {args.data}")
    if len({it.id for it in items}) != len(items):
        raise InputError(f"{args.data}: item ids repeat; each question needs a unique id")
    items, skipped = _check_images(items, args.skip_bad_lines)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args, bench)
    rank, world, state = _distributed()
    run_file = out / "run.json"
    if rank == 0:
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != json.loads(json.dumps(settings)):
                diff = [k for k in settings if previous.get(k) != json.loads(json.dumps(settings[k]))]
                raise InputError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                                 "rerun with the same arguments to resume, or use a new --output")
        else:
            run_file.write_text(json.dumps(settings, indent=2) + "\n")
    if state is not None:
        state.wait_for_everyone()

    merged = out / "samples.jsonl"
    log = SampleLog(merged if world == 1 else out / f"samples.rank{rank}.jsonl")
    if world > 1 and merged.exists():  # a finished or single-process part counts as done
        log.done.update(SampleLog(merged).done)
    mine = [it for n, it in enumerate(items) if n % world == rank and it.id not in log.done]
    device = args.device
    if device is None and state is not None and state.device.type != "cpu":
        device = str(state.device)  # one GPU per process
    if engine is None and args.backend == "vllm":
        engine = veridical.load(args.model, backend="vllm", **args.vllm_args)
    elif engine is None:
        engine = veridical.load(args.model, device=device)
    kwargs = {"method": args.method, "method_args": dict(args.method_args),
              "max_new_tokens": bench.max_new_tokens, "do_sample": args.do_sample,
              "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
              "num_beams": args.num_beams}
    _generate_all(engine, bench, mine, kwargs, run_seed(args), args.batch_size, log,
                  show=rank == 0, total=len(items) // world)

    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return {}
    if world > 1:
        _merge_shards(out, items, world)
    done = SampleLog(merged).done
    samples = [done[it.id] for it in items if it.id in done]
    metrics = bench.score(samples)
    results = {
        "metrics": metrics,
        "run": {**settings, "data": bench.data, "batch_size": args.batch_size, "processes": world,
                "items": len(samples), "skipped_items": skipped, "versions": versions(), "git_commit": git_commit(),
                "device": str(engine.device),
                "backend": getattr(engine, "backend", "transformers"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not quiet:
        print(markdown_table([(out.name, results)]))
    return results


def limit_items(items: list[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` items of each split (POPE) or subtask (MME), in order; CHAIR has one
    group. MME keeps an image's two questions together (its accuracy+ needs both), so a subtask
    may get one more than ``limit``. None: every item."""
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"--limit {limit!r} must be a positive integer (items per split or "
                         "subtask); leave it out to run every item")
    taken: dict[str, list[Item]] = {}
    for it in items:
        group = taken.setdefault(str(it.meta.get("split", it.meta.get("subtask", ""))), [])
        same_image = "subtask" in it.meta and group and \
            group[-1].meta.get("image") == it.meta.get("image")
        if len(group) < limit or same_image:
            group.append(it)
    kept = {id(it) for group in taken.values() for it in group}
    return [it for it in items if id(it) in kept]


def _check_images(items: list[Item], skip: bool) -> tuple[list[Item], dict[str, Any]]:
    """Fail before any generation when image files are missing, or with ``skip`` leave those
    items out and count them."""
    missing = [it for it in items
               if isinstance(path := it.image(), (str, Path)) and not Path(path).is_file()]
    if missing and not skip:
        raise InputError(
            f"{len(missing)} items name image files that do not exist (first: "
            f"{str(missing[0].image())!r} for item {missing[0].id}); restore them, fix --images, "
            "or pass --skip-bad-lines to skip and count them"
        )
    gone = {it.id for it in missing}
    return [it for it in items if it.id not in gone], {
        "missing_images": len(missing), "first": [it.id for it in missing[:10]]}


def progress_label(bench: Benchmark, kwargs: dict[str, Any]) -> str:
    """``pope adversarial vcd``, ``chair none beams=5``: what a progress bar is running."""
    splits = bench.data.get("splits") or []
    parts = [bench.name, *([",".join(splits)] if 0 < len(splits) < 3 else []), kwargs["method"]]
    if kwargs.get("num_beams", 1) > 1:
        parts.append(f"beams={kwargs['num_beams']}")
    return " ".join(parts)


def _generate_all(engine, bench: Benchmark, items: list[Item], kwargs: dict[str, Any],
                  seed: int, batch_size: int, log: SampleLog, show: bool, total: int) -> None:
    """Generate ``items`` in batches, each with its own seed (from the run ``seed`` and its
    id: the same at any batch size, process count or resume), appending to ``log``."""
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be >= 1")
    bar = tqdm(total=total, initial=total - len(items), desc=progress_label(bench, kwargs),
               unit="item", disable=not show, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        seeds = [derive_seed(seed, "item", it.id) for it in batch]
        results = engine.generate([it.image() for it in batch], [it.prompt for it in batch],
                                  **{**kwargs, "seed": seeds})
        log.append(
            {"id": it.id, "prompt": it.prompt, "output": r.text, "answer": bench.parse(r.text),
             "finish_reason": r.finish_reason, "completion_tokens": r.completion_tokens,
             "seed": r.seed, "meta": it.meta}
            for it, r in zip(batch, results)
        )
        bar.update(len(batch))
    bar.close()


def _merge_shards(out: Path, items: list[Item], world: int) -> None:
    done: dict[str, dict] = {}
    merged = out / "samples.jsonl"
    if merged.exists():
        done.update(SampleLog(merged).done)
    shards = [out / f"samples.rank{r}.jsonl" for r in range(world)]
    for shard in shards:
        if shard.exists():
            done.update(SampleLog(shard).done)
    tmp = out / "samples.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            if it.id in done:
                f.write(json.dumps(done[it.id], ensure_ascii=False) + "\n")
    tmp.replace(merged)
    for shard in shards:
        shard.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ reports

_HEADLINE = {
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "chair": ("chair_s", "chair_i", "recall", "length"),
    "mme": ("existence", "count", "position", "color", "hallucination", "perception", "cognition"),
}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    keys = _HEADLINE[results["run"]["benchmark"]]
    return {k: results["metrics"].get(k) for k in keys if k in results["metrics"]}


def markdown_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One markdown table: a row per run (name, method, then the headline metrics)."""
    keys: list[str] = []
    for _, res in rows:
        keys += [k for k in headline(res) if k not in keys]
    lines = ["| run | benchmark | method | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---:|" * len(keys)]
    for name, res in rows:
        values = headline(res)
        cells = [f"{values[k]:.4f}" if isinstance(values.get(k), float) else str(values.get(k, ""))
                 for k in keys]
        lines.append(f"| {name} | {res['run']['benchmark']} | {res['run']['method']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_samples(folder: str | Path) -> list[dict]:
    """The samples of a run folder (a line cut by a crash is left out)."""
    return list(SampleLog(Path(folder) / "samples.jsonl").done.values())
