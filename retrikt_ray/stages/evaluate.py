"""Stage 6: dev-set accuracy (and macro-F1) of the student + store, of the student head alone, and of
the teacher's calibrated zero-shot classifier; how often student + store answers what the teacher
answers; parameters and CPU latency per example of each.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..artifacts import StageResult, StageRun
from ..config import TEACHER_CLASSIFIER, JobSpec
from ..tasks import load_dev

NAME = "evaluate"
INPUTS = ("student",)
CONFIG_KEYS = ("task", "data.dev_file", "data.dev_limit", *TEACHER_CLASSIFIER, "evaluate")


def accuracy(gold: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == gold).mean())


def majority_share(labels: np.ndarray) -> float:
    """The accuracy of always answering the most common of these labels."""
    return float(np.bincount(labels).max() / len(labels))


def clearly_above_majority(accuracy: float, majority: float, count: int) -> bool:
    """Whether an accuracy on `count` labelled examples beats always answering their majority label by at
    least that guesser's standard error on this many examples."""
    return accuracy >= majority + math.sqrt(majority * (1 - majority) / count)


def macro_f1(gold: np.ndarray, probs: np.ndarray, num_labels: int) -> float:
    predicted = probs.argmax(axis=1)
    scores = []
    for label in range(num_labels):
        true_positive = np.sum((predicted == label) & (gold == label))
        precision_denominator, recall_denominator = np.sum(predicted == label), np.sum(gold == label)
        if precision_denominator + recall_denominator == 0:
            continue
        scores.append(2 * true_positive / (precision_denominator + recall_denominator))
    return float(np.mean(scores)) if scores else 0.0


def teacher_agreement(predictions) -> float | None:
    """The share of dev rows on which student + store answers what the teacher's calibrated zero-shot
    classifier answers (None when the predictions hold no teacher column)."""
    if "p_teacher" not in predictions:
        return None
    return float((np.stack(predictions["p_teacher"]).argmax(axis=1) == predictions["predicted"]).mean())


def ms_per_example(predict_one, examples, count: int) -> float:
    """CPU milliseconds per example, one example at a time (after one warm-up call)."""
    chosen = examples[:count]
    predict_one(chosen[0])
    started = time.perf_counter()
    for example in chosen:
        predict_one(example)
    return 1000 * (time.perf_counter() - started) / len(chosen)


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import pandas as pd
    import torch

    from ..knowledge_store import KnowledgeStore
    from ..retrieval_student import RetrievalStudent, predict_examples
    from ..teacher import Teacher, calibrate

    if spec.resources.torch_threads:
        torch.set_num_threads(spec.resources.torch_threads)
    settings = spec.evaluate
    task, dev = load_dev(spec)
    gold = np.array([example.label for example in dev])
    student = RetrievalStudent.load(stage.inputs["student"] / "model")
    store = KnowledgeStore.load(stage.inputs["student"] / "store")
    predictions = predict_examples(task, student, store, dev, settings.batch_size)

    metrics = {
        "dev_examples": len(dev),
        "accuracy_student_store": accuracy(gold, predictions["p"]),
        "accuracy_student_head": accuracy(gold, predictions["p_head"]),
        "accuracy_retrieval_only": accuracy(gold, predictions["p_ret"]),
        "macro_f1_student_store": macro_f1(gold, predictions["p"], task.num_labels),
        "params_student": sum(p.numel() for p in student.parameters()),
        "store_rows": len(store.inputs),
        "ms_per_example_student_store": ms_per_example(
            lambda e: predict_examples(task, student, store, [e]), dev, settings.latency_examples
        ),
    }
    frame = pd.DataFrame(
        {
            "gold": gold,
            "predicted": predictions["p"].argmax(axis=1),
            "p": list(predictions["p"]),
            "p_head": list(predictions["p_head"]),
        }
    )

    if settings.teacher_zero_shot:
        teacher = Teacher.from_spec(spec, task)
        raw = teacher.classify_raw(dev, spec.teacher.classify_batch_size)
        # The reference set is the unlabelled dev inputs themselves (or content-free inputs).
        reference = teacher.content_free_reference() if spec.teacher.calibration == "content_free" else raw.mean(axis=0)
        calibrated = calibrate(raw, reference)
        metrics |= {
            "accuracy_teacher_zero_shot": accuracy(gold, calibrated),
            "accuracy_teacher_uncalibrated": accuracy(gold, raw),
            "macro_f1_teacher_zero_shot": macro_f1(gold, calibrated, task.num_labels),
            "params_teacher": sum(p.numel() for p in teacher.model.parameters()),
            "teacher_precision": teacher.engine.precision.names(),
            "ms_per_example_teacher": ms_per_example(
                lambda e: teacher.classify_raw([e]), dev, settings.latency_examples
            ),
        }
        frame["p_teacher"] = list(calibrated)
        metrics["agreement_student_teacher"] = teacher_agreement(frame)
    frame.to_parquet(stage.dir / "predictions.parquet", index=False)
    summary = (
        f"student+store {metrics['accuracy_student_store']:.3f}, head alone {metrics['accuracy_student_head']:.3f}"
    )
    if "accuracy_teacher_zero_shot" in metrics:
        summary += (
            f", teacher zero-shot {metrics['accuracy_teacher_zero_shot']:.3f} "
            f"(student agrees on {metrics['agreement_student_teacher']:.1%})"
        )
    return StageResult(
        metrics=metrics, counts={"dev_examples": len(dev)}, summary=summary + f" on {len(dev)} dev examples"
    )
