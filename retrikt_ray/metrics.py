"""Scores of predicted distributions against gold labels, shared by the stages that measure (evaluate,
student, ppo), `retrikt grow` and the benchmarks: accuracy, macro-F1, the majority-label guesser, agreement with
the teacher, the exact McNemar test of two classifiers on the same rows, and CPU latency per example."""

from __future__ import annotations

import math
import time

import numpy as np


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


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: the discordant rows as a binomial(n, 1/2) draw."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, i) for i in range(min(only_first, only_second) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired(baseline_right: np.ndarray, variant_right: np.ndarray) -> dict:
    """Rows only the baseline gets right, only the variant gets right, and the exact McNemar p-value."""
    baseline_right, variant_right = np.asarray(baseline_right, bool), np.asarray(variant_right, bool)
    only_baseline = int((baseline_right & ~variant_right).sum())
    only_variant = int((~baseline_right & variant_right).sum())
    return {
        "only_baseline_right": only_baseline,
        "only_variant_right": only_variant,
        "p_value": mcnemar_exact(only_baseline, only_variant),
    }


def ms_per_example(predict_one, examples, count: int) -> float:
    """CPU milliseconds per example, one example at a time (after one warm-up call)."""
    chosen = examples[:count]
    predict_one(chosen[0])
    started = time.perf_counter()
    for example in chosen:
        predict_one(example)
    return 1000 * (time.perf_counter() - started) / len(chosen)
