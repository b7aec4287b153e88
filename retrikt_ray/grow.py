"""`retrikt grow`: new in-domain texts (a file, or what the endpoint captured) become a new version of a run's
served model (versions.py).

1. The texts are read in the task's format (no label needed). Texts equal to a labelled or a dev example, texts
   already in the store, repeats and texts under `min_words` words are skipped; then, in an order drawn with
   `seed`, texts whose embedding by the served student is within `generate.near_duplicate_cosine` of a store row
   are skipped, until `limit` texts are kept. Every skip is counted by its reason.
2. The teacher labels them as the unlabelled stage does (calibrated soft labels and h_T), in a Ray Data pass that
   resumes from the chunks it saved after a kill.
3. With retraining (the default), the student stage runs again, on the parent version's training rows plus the
   new ones (the upstream stages are not redone); without, the rows are appended to the served store, keyed by
   the served student, and the student stays as it is.
4. The new version is evaluated on the dev set beside its parent (exact McNemar), published with one rename, and
   made the current version: a running server follows on `retrikt serve RUN_DIR --reload`.

The teacher's labels are kept under `<run>/versions/.labels-<key>/` (the key: the parent version, the texts, seed
and min_words, which fix the draw order), so that a larger --limit or a grow without retraining of the same draw
labels only what is new. The rest of the work lives in `<run>/versions/.grow-<key>/` (the key adds limit and
retraining): a rerun after a kill continues there; a rerun after success finds the version it made and makes it
current again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import versions
from .artifacts import StageRun, file_digest, is_finished, read_manifest
from .config import JobSpec, SpecError, content_hash
from .tasks import Example, Task, data_files, screen_texts

WORK_PREFIX = ".grow-"
LABELS_PREFIX = ".labels-"
NEAR_DUPLICATE_CHUNK = 512  # texts embedded at a time while looking for `limit` that are not near-duplicates


def read_texts(run_dir, texts: Path | None, from_traffic: bool) -> tuple[list[Example], dict]:
    """The candidate texts of a finished run and where they come from (kind, path, digest, rows); a bad file is
    one SpecError naming its path and line."""
    run_dir = Path(run_dir).resolve()
    task = Task.from_spec(versions.load_run_spec(run_dir).task)
    if from_traffic:
        from .capture import read_traffic

        fields, digest = read_traffic(run_dir)
        if not fields:
            raise SpecError(f"{run_dir}: no captured traffic (serve.capture.enabled is off, or nothing was asked)")
        examples = []
        for number, row in enumerate(fields, 1):
            missing = [name for name in task.input_fields if not row.get(name)]
            if missing:
                raise SpecError(f"captured traffic row {number}: no {missing[0]!r} field")
            examples.append(Example(fields={name: row[name] for name in task.input_fields}, label=-1))
        return examples, {"kind": "traffic", "rows": len(examples), "digest": digest}
    if texts is None:
        raise SpecError("grow: give --texts FILE or --from-traffic")
    path = Path(texts).expanduser().resolve()
    examples = load_texts(task, path)
    return examples, {"kind": "file", "path": str(path), "digest": file_digest(path), "rows": len(examples)}


def load_texts(task: Task, path: Path) -> list[Example]:
    """A texts file in the format its name says (.jsonl, .tsv, .csv, optionally .gz; .txt: one text per line for
    a task with one input field), else the task's; labels are not needed."""
    suffixes = [suffix.lower() for suffix in path.suffixes if suffix.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix != ".txt":
        known = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv"}
        return task.load(path, labelled=False, file_format=known.get(suffix))
    if len(task.input_fields) > 1:
        raise SpecError(f"{path}: a .txt file holds one text per line; task {task.name} takes {task.input_fields}")
    from .tasks import normalise, read_text_lines

    field = task.input_fields[0]
    examples = [
        Example({field: normalise(line)}, -1, f"{path}:{number}")
        for number, line in read_text_lines(path)
        if line.strip()
    ]
    if not examples:
        raise SpecError(f"{path}: no texts")
    return examples


def labels_key(parent: versions.Version, source: dict, seed: int, min_words: int) -> str:
    """What the teacher's raw labels of the drawn texts depend on: the draw (not how many are kept)."""
    return content_hash(
        {
            "parent": parent.name,
            "parent_store": json.loads((parent.store_dir / "store.json").read_text())["version"],
            "texts": source["digest"],
            "seed": seed,
            "min_words": min_words,
        }
    )[:12]


def grow_key(labels: str, limit: int | None, retrain: bool) -> str:
    return content_hash({"labels": labels, "limit": limit, "retrain": retrain})[:12]


def select(
    spec: JobSpec,
    task: Task,
    candidates: list[Example],
    parent: versions.Version,
    limit: int | None,
    seed: int,
    min_words: int,
    log: Callable[[str], None],
) -> tuple[list[Example], Counter]:
    """The texts to label (in file order) and the skipped ones counted by reason (module docstring, step 1)."""
    from .knowledge_store import KnowledgeStore
    from .retrieval_student import RetrievalStudent

    train, dev_file = data_files(spec, task)
    labelled = task.few_shot(task.load(train), spec.data.shots, spec.data.seed)
    dev = task.load(dev_file)  # all of it, whatever data.dev_limit scores
    store = KnowledgeStore.load(parent.store_dir)
    in_store = {(a.lower(), (b or "").lower()) for a, b in store.inputs}
    eligible, skipped = screen_texts(task, candidates, {"labelled_example": labelled, "in_dev_set": dev}, min_words)
    fresh = []
    for example in eligible:
        rows = {(a.lower(), (b or "").lower()) for a, b in task.student_inputs(example)}
        if rows <= in_store:
            skipped["in_store"] += 1
        else:
            fresh.append(example)
    order = [int(index) for index in np.random.default_rng(seed).permutation(len(fresh))]
    wanted = len(fresh) if limit is None else min(limit, len(fresh))
    student = RetrievalStudent.load(parent.model_dir, spec.student.trust_remote_code, spec.student.dtype)
    threshold = spec.generate.near_duplicate_cosine
    kept: list[int] = []
    examined = 0
    while len(kept) < wanted and examined < len(order):
        chunk = order[examined : examined + max(NEAR_DUPLICATE_CHUNK, wanted - len(kept))]
        examined += len(chunk)
        rows = [task.student_inputs(fresh[index]) for index in chunk]
        flat = [row for example_rows in rows for row in example_rows]
        scores, _ = store.search(student.embed_all(flat, batch_size=spec.store.encode_batch_size), 1)
        position = 0
        for index, example_rows in zip(chunk, rows):
            best = float(scores[position : position + len(example_rows), 0].max())
            position += len(example_rows)
            if len(kept) >= wanted:
                skipped["not_drawn"] += 1
            elif best >= threshold:
                skipped["near_duplicate_of_store"] += 1
            else:
                kept.append(index)
    skipped["not_drawn"] += len(order) - examined
    if skipped["not_drawn"] == 0:
        del skipped["not_drawn"]
    log(f"[grow] {len(kept)} texts to label of {len(candidates)} read ({describe(skipped)})")
    # In the drawn order: a larger --limit with the same seed draws these first, so their saved labels serve it.
    return [fresh[index] for index in kept], skipped


def describe(skipped: Counter) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()) if count) or "none skipped"


def grow(
    run_dir,
    candidates: list[Example],
    source: dict,
    limit: int | None = None,
    seed: int = 0,
    retrain: bool = True,
    min_words: int | None = None,
    log: Callable[[str], None] = print,
) -> versions.Version:
    """Make a new version of the run's served model from the texts `read_texts` gave (module docstring)."""
    from .ray_session import ray_session

    run_dir = Path(run_dir).resolve()
    spec = versions.load_run_spec(run_dir)
    task = Task.from_spec(spec.task)
    parent = versions.current(run_dir)
    min_words = spec.unlabelled.min_words if min_words is None else min_words
    labels = labels_key(parent, source, seed, min_words)
    key = grow_key(labels, limit, retrain)
    for version in versions.grown(run_dir):
        if version.record.get("grow_key") == key:
            versions.use(run_dir, version.name)
            log(f"[grow] {version.name} was already grown from these texts on {parent.name}; it is current again")
            return version
    work = versions.versions_dir(run_dir) / f"{WORK_PREFIX}{key}"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    selected, skipped = select(spec, task, candidates, parent, limit, seed, min_words, log)
    if not selected:
        shutil.rmtree(work, ignore_errors=True)
        raise SpecError(f"grow: no text left to add ({describe(skipped)})")
    timings["selecting_s"] = time.perf_counter() - started
    with ray_session(spec):
        started = time.perf_counter()
        rows = label(spec, task, selected, versions.versions_dir(run_dir) / f"{LABELS_PREFIX}{labels}")
        timings["labelling_s"] = time.perf_counter() - started
        staging = work / "version"
        if staging.exists():  # a killed earlier try's: everything in it is made again from the saved work
            shutil.rmtree(staging)
        staging.mkdir()
        started = time.perf_counter()
        added = build(spec, task, parent, rows, staging, work, key, retrain, log)
        timings["retraining_s" if retrain else "appending_s"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = evaluate(spec, run_dir, staging, parent)
    timings["evaluating_s"] = time.perf_counter() - started
    record = {
        "parent": parent.name,
        "grow_key": key,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "retrained": retrain,
        "seed": seed,
        "limit": limit,
        "min_words": min_words,
        "counts": {
            "texts_read": len(candidates),
            "texts_added": len(selected),
            "rows_added": added,
            "store_rows": evaluation.pop("store_rows"),
            **{f"skipped_{reason}": count for reason, count in sorted(skipped.items())},
            **{
                f"teacher_label_{task.label_names[label]}": int((rows["labels"] == label).sum())
                for label in range(task.student_num_labels)
                if task.kind == "classification"
            },
        },
        "evaluation": evaluation,
        "timings": timings,
    }
    version = versions.publish(run_dir, staging, record)
    versions.use(run_dir, version.name)
    shutil.rmtree(work, ignore_errors=True)
    return version


def label(spec: JobSpec, task: Task, selected: list[Example], folder: Path) -> dict:
    """Store rows of the selected texts with the teacher's calibrated soft labels and h_T. The raw labels are
    saved in chunks under `folder` and kept: a rerun after a kill, a grow of the same draw with another --limit
    or without retraining, label only what is not there yet."""
    import pandas as pd

    from .samples import ANNOTATION_SHARDS, annotate, store_rows

    frame = pd.DataFrame(
        {
            "label": [-1] * len(selected),
            "text": [task.example_text(example) for example in selected],
            "fields": [json.dumps(example.fields) for example in selected],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    annotated, resumed = annotate(spec, task, frame, spec.model_dump(mode="json"), folder / ANNOTATION_SHARDS)
    annotated["label"] = [int(np.argmax(soft)) for soft in annotated["soft_label"]]
    return store_rows(task, annotated)


def build(
    spec: JobSpec,
    task: Task,
    parent: versions.Version,
    rows: dict,
    staging: Path,
    work: Path,
    key: str,
    retrain: bool,
    log: Callable[[str], None],
) -> int:
    """The new version's train_store, model and store in `staging`; returns the rows added."""
    from .knowledge_store import KnowledgeStore
    from .retrieval_student import RetrievalStudent, encoder_fingerprint
    from .stages import student as student_stage

    batch = spec.store.encode_batch_size

    def keyed_by(student) -> KnowledgeStore:
        keys = student.embed_all(rows["inputs"], batch_size=batch)
        return KnowledgeStore(keys=keys, encoder_fingerprint=encoder_fingerprint(student.encoder), **rows)

    # Keys of the untrained encoder, in float32 as the store stage makes them: what a retraining reads.
    untrained = RetrievalStudent.from_spec(spec.student, task.student_num_labels, dtype="float32")
    train_store = KnowledgeStore.load(parent.train_store_dir).appended(keyed_by(untrained))
    train_store.save(staging / "train_store")
    if retrain:
        stage = StageRun(
            name="student",
            run_dir=work,
            stage_hash=key,
            config=spec.student.model_dump(mode="json"),
            inputs={"store": staging / "train_store"},
            input_hashes={},
        )
        if not is_finished(stage.dir, key):
            stage.prepare()
            started = time.perf_counter()
            result = student_stage.run(spec, stage)
            stage.finish(result, time.perf_counter() - started)
            log(f"[grow] student retrained on {len(train_store)} rows: {result.summary}")
        else:
            log(f"[grow] student retrained earlier on {len(train_store)} rows, reused")
        versions.link_or_copy_tree(stage.dir / "model", staging / "model")
        versions.link_or_copy_tree(stage.dir / "store", staging / "store")
        (staging / "student_manifest.json").write_text(json.dumps(read_manifest(stage.dir), indent=2, default=str))
    else:
        versions.link_or_copy_tree(parent.model_dir, staging / "model")
        served = RetrievalStudent.load(parent.model_dir, spec.student.trust_remote_code, "float32")
        KnowledgeStore.load(parent.store_dir).appended(keyed_by(served)).save(staging / "store")
        log(f"[grow] {len(rows['inputs'])} rows appended to the store, keyed by {parent.name}'s student")
    return len(rows["inputs"])


def evaluate(spec: JobSpec, run_dir: Path, staging: Path, parent: versions.Version) -> dict:
    """The staged version on the dev set, as the evaluate stage measures it, beside its parent and v0."""
    import pandas as pd

    from .knowledge_store import KnowledgeStore
    from .metrics import accuracy, paired, teacher_agreement
    from .retrieval_student import RetrievalStudent, predict_examples
    from .tasks import load_dev

    task, dev = load_dev(spec)
    gold = np.array([example.label for example in dev])
    student = RetrievalStudent.load(staging / "model", spec.student.trust_remote_code, spec.student.dtype)
    store = KnowledgeStore.load(staging / "store")
    predicted = predict_examples(task, student, store, dev, spec.evaluate.batch_size)
    frame = pd.DataFrame(
        {
            "gold": gold,
            "predicted": predicted["p"].argmax(axis=1),
            "p": list(predicted["p"]),
            "p_head": list(predicted["p_head"]),
            "p_ret": list(predicted["p_ret"]),
        }
    )
    original = versions.original(run_dir)
    if original.predictions.is_file():
        before = pd.read_parquet(original.predictions)
        if "p_teacher" in before and len(before) == len(frame):
            frame["p_teacher"] = before["p_teacher"]
    frame.to_parquet(staging / "predictions.parquet", index=False)
    right = frame["predicted"].to_numpy() == gold
    evaluation = {
        "dev_examples": len(dev),
        "accuracy_student_store": accuracy(gold, predicted["p"]),
        "accuracy_student_head": accuracy(gold, predicted["p_head"]),
        "accuracy_retrieval_only": accuracy(gold, predicted["p_ret"]),
        "store_rows": len(store),
    }
    agreement = teacher_agreement(frame)
    if agreement is not None:
        evaluation["agreement_student_teacher"] = agreement
    for name, version in (("parent", parent), ("original", original)):
        if name == "original" and version.name == parent.name:
            continue
        if version.predictions.is_file():
            theirs = pd.read_parquet(version.predictions)
            if len(theirs) == len(frame):
                earlier = theirs["predicted"].to_numpy() == gold
                evaluation[f"against_{name}"] = {
                    "version": version.name,
                    "accuracy": float(earlier.mean()),
                    "gain": float(right.mean() - earlier.mean()),
                    **paired(earlier, right),
                }
    return evaluation


def describe_version(version: versions.Version) -> str:
    """One line of `retrikt grow`'s and `retrikt versions`'s output."""
    record = version.record
    evaluation = record.get("evaluation") or {}
    counts = record.get("counts") or {}
    parts = [version.name]
    if record.get("parent"):
        parts.append(f"from {record['parent']} +{counts.get('texts_added', 0)} texts")
        parts.append("retrained" if record.get("retrained") else "store only")
    if counts.get("store_rows") is not None:
        parts.append(f"{counts['store_rows']} store rows")
    if evaluation.get("accuracy_student_store") is not None:
        parts.append(f"dev {evaluation['accuracy_student_store']:.3f}")
    against = evaluation.get("against_parent")
    if against:
        gain, p_value = 100 * against["gain"], against["p_value"]
        parts.append(f"{gain:+.1f} points vs {against['version']} (McNemar p {p_value:.3f})")
    return ", ".join(parts)
