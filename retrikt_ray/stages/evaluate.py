"""Stage 6: dev-set accuracy (and macro-F1) of the student + store, of the student head alone, and of
the teacher's calibrated zero-shot classifier; how often student + store answers what the teacher
answers; parameters and CPU latency per example of each.
"""

from __future__ import annotations

import numpy as np

from ..artifacts import StageResult, StageRun
from ..config import TEACHER_CLASSIFIER, JobSpec
from ..metrics import accuracy, macro_f1, ms_per_example, teacher_agreement
from ..stage_contract import Stage
from ..tasks import load_dev


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import pandas as pd
    import torch

    from ..knowledge_store import KnowledgeStore
    from ..retrieval_student import RetrievalStudent, predict_examples
    from ..teacher import Teacher, calibrate, calibration_reference

    if spec.resources.torch_threads:
        torch.set_num_threads(spec.resources.torch_threads)
    settings = spec.evaluate
    task, dev = load_dev(spec)
    gold = np.array([example.label for example in dev])
    student = RetrievalStudent.load(
        stage.inputs["student"] / "model", spec.student.trust_remote_code, spec.student.dtype
    )
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
        calibrated = calibrate(raw, calibration_reference(spec, raw, teacher))
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


STAGE = Stage(
    name="evaluate",
    run=run,
    inputs=("student",),
    reads=("task", "data.dev_file", "data.dev_limit", *TEACHER_CLASSIFIER, "evaluate"),
    files=("dev",),
)
