"""Stage 3b, beyond the paper's recipe: the teacher labels in-domain texts that have no labels, and they
join its generated samples in the store (off by default: `unlabelled.samples: 0`).

Why: the student learns the teacher's soft labels of the teacher's own generations, and what it learns
there carries over to real inputs only so far (benchmarks/results/student_variants_demo_pool.md: past
about 1100 generated rows, a bigger pool does not raise accuracy). Real in-domain inputs, which a user
usually has without labels, bring the student closer to the teacher on real inputs
(benchmarks/results/student_variants_demo_unlabelled.md: agreement 80.6 -> 82.5 -> 84.1% with 0 / 2000 /
6000 texts; accuracy 81.1 / 82.5 / 81.8%, not significantly different).

The texts come from `unlabelled.file` (default: the training file, its labels ignored). Texts equal to
a labelled example or a dev example, repeats, and texts under `min_words` words are skipped and counted;
then `samples` of the rest are drawn with `seed` and annotated like generated samples (calibrated p_C,
the calibration reference being these texts themselves, and h_T) in a Ray Data pass that resumes from the
chunks it saved before an interruption. Each keeps the teacher's answer as its label.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from ..artifacts import StageResult, StageRun
from ..config import JobSpec
from ..samples import ANNOTATION_SHARDS, annotate, save_samples
from ..stage_contract import Stage
from ..tasks import Example, Task, data_files, draw, screen_texts


def draw_texts(spec: JobSpec, task: Task) -> tuple[list[Example], Counter, int]:
    """(drawn examples, Counter of skip reasons, texts eligible before the draw)."""
    train, dev_file = data_files(spec, task)
    train_rows = task.load(train)  # read once: the few shots' pool and, by default, the texts
    labelled = task.few_shot(train_rows, spec.data.shots, spec.data.seed)
    texts = task.load(spec.unlabelled.file, labelled=False) if spec.unlabelled.file else train_rows
    dev = task.load(dev_file)  # all of it, whatever data.dev_limit scores
    eligible, skipped = screen_texts(
        task, texts, {"labelled_example": labelled, "in_dev_set": dev}, spec.unlabelled.min_words
    )
    return draw(eligible, spec.unlabelled.samples, spec.unlabelled.seed), skipped, len(eligible)


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import pandas as pd

    task = Task.from_spec(spec.task)
    columns = ["label", "text", "fields"]
    if spec.unlabelled.samples == 0:
        save_samples(stage.dir, pd.DataFrame(columns=[*columns, "teacher_state", "soft_label"]))
        return StageResult(metrics={}, counts={"annotated": 0}, summary="off (unlabelled.samples: 0)")
    drawn, skipped, eligible = draw_texts(spec, task)
    frame = pd.DataFrame(
        {
            "label": [-1] * len(drawn),
            "text": [task.example_text(example) for example in drawn],
            "fields": [json.dumps(example.fields) for example in drawn],
        },
        columns=columns,
    )
    annotated, chunks_resumed = annotate(spec, task, frame, spec.model_dump(mode="json"), stage.dir / ANNOTATION_SHARDS)
    annotated["label"] = [int(np.argmax(soft)) for soft in annotated["soft_label"]]
    save_samples(stage.dir, annotated)
    short = f"; {spec.unlabelled.samples} asked, only {eligible} eligible" if eligible < spec.unlabelled.samples else ""
    counts = {
        "eligible": eligible,
        "annotated": len(annotated),
        **{f"skipped_{reason}": count for reason, count in sorted(skipped.items())},
        **{
            f"teacher_label_{task.label_names[label]}": int((annotated["label"] == label).sum())
            for label in range(task.num_labels)
        },
    }
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
    return StageResult(
        metrics={"annotation_chunks_resumed": chunks_resumed},
        counts=counts,
        summary=f"{len(annotated)} texts labelled by the teacher (skipped: {reasons or 'none'}){short}",
    )


STAGE = Stage(
    name="unlabelled",
    run=run,
    reads=("task", "data.train_file", "data.dev_file", "data.shots", "data.seed", "teacher", "unlabelled"),
    files=("train", "dev", "unlabelled"),
)
