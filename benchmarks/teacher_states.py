"""Which teacher similarity should L_rank distil? A representation is worth distilling only when its
neighbours predict the label, so each candidate is scored as the student's retrieval readout would use
it: dev row -> its k nearest store rows by cosine -> softmax(cos / tau) over their soft labels q_T.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/teacher_states.py --run runs/quality/<a finished run>

Candidates, each on the raw states and centred on the store's mean: the teacher's state where it reads
off its answer (`teacher.state: answer`, the classification prompt's last token) and its mean-pooled
state over the text alone (`mean_pool`, the original h_T, docs/method.md), at several layers; and the student encoder
before training. Classification tasks only. Writes benchmarks/results/teacher_states.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def knn_accuracy(
    dev: np.ndarray, store: np.ndarray, soft_labels: np.ndarray, gold: np.ndarray, k: int, tau: float
) -> float:
    """Accuracy of sum_j softmax_j(cos / tau) q_j over each dev row's k most similar store rows."""
    dev = dev / np.linalg.norm(dev, axis=1, keepdims=True)
    store = store / np.linalg.norm(store, axis=1, keepdims=True)
    cosines = dev @ store.T
    top = np.argsort(-cosines, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(cosines, top, axis=1) / tau)
    weights /= weights.sum(axis=1, keepdims=True)
    probs = np.einsum("nk,nkc->nc", weights, soft_labels[top])
    return float((probs.argmax(axis=1) == gold).mean())


def mean_pairwise_cosine(states: np.ndarray) -> float:
    unit = states / np.linalg.norm(states, axis=1, keepdims=True)
    cosines = unit @ unit.T
    return float(cosines[np.triu_indices(len(unit), 1)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="A run directory whose generate stage finished")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1, -7, -13], help="Teacher layers to compare")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "teacher_states",
        help="Results path without suffix",
    )
    args = parser.parse_args()

    import pandas as pd

    from retrikt_ray.config import load_spec
    from retrikt_ray.retrieval_student import RetrievalStudent
    from retrikt_ray.tasks import Example, load_dev
    from retrikt_ray.teacher import Teacher

    spec = load_spec(args.run / "job.yaml")
    task, dev = load_dev(spec)
    if task.kind != "classification":
        sys.exit(f"--run: task '{task.name}' is a choice task; this benchmark compares classification readouts only")
    samples = pd.read_parquet(args.run / "generate" / "samples.parquet")
    stored = [
        Example(fields=json.loads(fields), label=int(label))
        for fields, label in zip(samples["fields"], samples["label"])
    ]
    soft_labels = np.stack(samples["soft_label"].to_numpy())
    gold = np.array([example.label for example in dev])
    k, tau = spec.student.k, spec.student.tau
    teacher = Teacher.from_spec(spec, task)
    batch = spec.teacher.classify_batch_size

    rows = []
    for kind in ("answer", "mean_pool"):
        for layer in args.layers:
            dev_states, store_states = (teacher.annotate(examples, kind, layer, batch)[1] for examples in (dev, stored))
            centre = store_states.mean(axis=0)
            rows.append(
                {
                    "representation": f"teacher {kind}",
                    "layer": layer,
                    "accuracy_raw": knn_accuracy(dev_states, store_states, soft_labels, gold, k, tau),
                    "accuracy_centred": knn_accuracy(
                        dev_states - centre, store_states - centre, soft_labels, gold, k, tau
                    ),
                    "mean_cosine_raw": mean_pairwise_cosine(store_states),
                    "mean_cosine_centred": mean_pairwise_cosine(store_states - centre),
                }
            )
            print(rows[-1], flush=True)
    encoder = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    dev_keys = encoder.embed_all([row for example in dev for row in task.student_inputs(example)])
    store_keys = encoder.embed_all([row for example in stored for row in task.student_inputs(example)])
    rows.append(
        {
            "representation": f"student encoder before training ({spec.student.model})",
            "layer": None,
            "accuracy_raw": knn_accuracy(dev_keys, store_keys, soft_labels, gold, k, tau),
            "accuracy_centred": None,
            "mean_cosine_raw": mean_pairwise_cosine(store_keys),
            "mean_cosine_centred": None,
        }
    )
    settings = {
        "run": args.run.name,
        "task": task.name,
        "teacher": spec.teacher.model,
        "dev_examples": len(dev),
        "store_rows": len(stored),
        "k": k,
        "tau": tau,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, settings))
    print(args.out.with_suffix(".md").read_text())


def markdown(rows: list[dict], settings: dict) -> str:
    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}"

    def cosine(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"# Teacher similarities as a retrieval readout: {settings['task']}, teacher `{settings['teacher']}`",
        "",
        f"Run `{settings['run']}`: {settings['dev_examples']} dev rows, {settings['store_rows']} store rows "
        f"(its generated samples with their soft labels), k = {settings['k']}, tau = {settings['tau']}. "
        "Accuracy of the dev rows' neighbours' soft labels; "
        "centred: minus the store's mean state. Chance is about 50% here.",
        "",
        "| representation | layer | kNN accuracy % raw | centred | mean pairwise cosine raw | centred |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        layer = "-" if row["layer"] is None else str(row["layer"])
        lines.append(
            f"| {row['representation']} | {layer} | {percent(row['accuracy_raw'])} | "
            f"{percent(row['accuracy_centred'])} | "
            f"{cosine(row['mean_cosine_raw'])} | {cosine(row['mean_cosine_centred'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
