"""Stage 4: the knowledge store. One row per student input of each kept sample (choice tasks: one
per alternative), with the teacher's soft label q_T, h_T, and a key = the L2-normalised embedding of
the row by the (not yet trained) student encoder. The FAISS index is exact up to store.exact_max_rows.
store.fraction < 1 keeps a random share of the samples (store-size ablations). The student stage
re-encodes the keys with the trained encoder and saves the store it serves with.
"""

from __future__ import annotations

import numpy as np

from ..artifacts import StageResult, StageRun
from ..config import JobSpec
from ..samples import read_samples, store_rows
from ..stage_contract import EMBEDDING_ONLY, Stage
from ..tasks import Task


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import pandas as pd

    from ..knowledge_store import KnowledgeStore
    from ..retrieval_student import RetrievalStudent, encoder_fingerprint

    task = Task.from_spec(spec.task)
    generated, unlabelled = read_samples(stage.inputs["generate"]), read_samples(stage.inputs["unlabelled"])
    columns = ["label", "fields", "soft_label", "teacher_state"]
    samples = pd.concat(
        [generated[columns].assign(unlabelled=False), unlabelled[columns].assign(unlabelled=True)], ignore_index=True
    )
    if spec.store.fraction < 1:
        chosen = np.random.default_rng(spec.generate.seed).permutation(len(samples))[
            : max(1, round(spec.store.fraction * len(samples)))
        ]
        samples = samples.iloc[np.sort(chosen)].reset_index(drop=True)
    rows = store_rows(task, samples)
    if not rows["inputs"]:
        from ..config import SpecError

        raise SpecError(
            "generate: no sample survived filtering, the store would be empty (see the generate manifest's counts)"
        )
    student = RetrievalStudent.from_spec(spec.student, task.student_num_labels, dtype="float32")
    keys = student.embed_all(rows["inputs"], batch_size=spec.store.encode_batch_size, progress=True)
    store = KnowledgeStore(keys=keys, encoder_fingerprint=encoder_fingerprint(student.encoder), **rows)
    settings = spec.store
    store.build_index(
        settings.index, settings.exact_max_rows, settings.hnsw_m, settings.ivf_lists, settings.pq_subquantizers
    )
    store.save(stage.dir)
    return StageResult(
        metrics={"dim": int(keys.shape[1]), "index": store.index_kind, "version": store.version},
        counts={
            "rows": len(rows["inputs"]),
            "examples": len(samples),
            "examples_unlabelled": int(samples["unlabelled"].sum()),
        },
        summary=f"{len(rows['inputs'])} rows ({int(samples['unlabelled'].sum())} examples from unlabelled texts), "
        f"{store.index_kind} index, dim {keys.shape[1]}",
    )


STAGE = Stage(
    name="store",
    run=run,
    inputs=("generate", "unlabelled"),
    reads=("task", "student.model", "student.max_length", "student.trust_remote_code", "store"),
    ignores=EMBEDDING_ONLY,
)
