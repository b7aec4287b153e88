"""What a user would pick instead of RetriKT, on the same few labelled examples and the same student
or teacher, each returning task-level probabilities (n, num_labels) on the evaluation examples:

- `finetune_student`: the student encoder and a linear head fine-tuned on the labelled examples only;
- `linear_probe`: a linear head on the frozen student's embeddings;
- `setfit_student`: SetFit (the `setfit` library): contrastive pair tuning of the same student, then a
  logistic-regression head;
- `tuned_prompt_teacher`: the teacher with the stage-1 soft prompt as a generative classifier,
  p(y | x) proportional to p(x | [P] generation prompt of y), calibrated like the zero-shot classifier.

The ZeroGen-style baseline (the student distilled on the generated data, without retrieval) is a
pipeline run with `student.lam = 0` and `student.b = 0`; the teacher's calibrated zero-shot classifier
is part of the evaluate stage.

Used by the quality benchmark (benchmarks/quality.py) and its tests, not by the package.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from retrikt_ray.config import JobSpec
from retrikt_ray.retrieval_student import RetrievalStudent, ce_loss, example_probs
from retrikt_ray.tasks import Example, Task


class BaselineSettings(BaseModel):
    """Budgets of the student-alone baselines (the student's own model, max_length and lr come from the job spec)."""

    model_config = ConfigDict(extra="forbid")

    finetune_epochs: int = Field(10, ge=1, description="Passes over the labelled examples when fine-tuning the student")
    probe_epochs: int = Field(200, ge=1, description="Full-batch steps of the linear probe's head")
    probe_lr: float = Field(1e-2, gt=0, description="Learning rate of the linear probe's head")
    batch_size: int = Field(16, ge=1, description="Labelled rows per fine-tuning step")
    setfit_iterations: int = Field(
        10, ge=1, description="SetFit num_iterations: contrastive pairs drawn per labelled row"
    )
    setfit_epochs: int = Field(1, ge=1, description="SetFit passes over the contrastive pairs")
    setfit_batch_size: int = Field(16, ge=1, description="SetFit pairs per contrastive step")
    teacher_batch_size: int = Field(
        16, ge=1, description="Sequences per teacher forward of the tuned-prompt classifier"
    )


def labelled_rows(task: Task, examples: list[Example]) -> tuple[list[tuple[str, str | None]], list[int]]:
    """The student rows of labelled examples and their row targets (choice tasks: right / wrong)."""
    rows = [row for example in examples for row in task.student_inputs(example)]
    targets = [target for example in examples for target in task.row_targets(example)]
    return rows, targets


def head_predictions(
    task: Task, student: RetrievalStudent, examples: list[Example], batch_size: int = 64
) -> np.ndarray:
    """Task-level probabilities of the student's head alone (no store)."""
    rows, _ = labelled_rows(task, examples)
    z = torch.from_numpy(student.embed_all(rows, batch_size))
    with torch.no_grad():
        return example_probs(task, student.head_probs(z).numpy(), len(examples))


def finetune_student(
    spec: JobSpec, task: Task, few_shot: list[Example], settings: BaselineSettings
) -> RetrievalStudent:
    """Encoder and head trained with cross-entropy on the labelled rows (student.lr / student.head_lr)."""
    torch.manual_seed(spec.student.seed)
    student = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    rows, targets = labelled_rows(task, few_shot)
    head_ids = {id(parameter) for parameter in student.head.parameters()}
    optimiser = torch.optim.AdamW(
        [
            {
                "params": [p for p in student.parameters() if id(p) not in head_ids],
                "lr": spec.student.lr,
                "weight_decay": spec.student.weight_decay,
            },
            {"params": list(student.head.parameters()), "lr": spec.student.head_lr, "weight_decay": 0.0},
        ]
    )
    generator = np.random.default_rng(spec.student.seed)
    student.train()
    for _ in range(settings.finetune_epochs):
        order = generator.permutation(len(rows))
        for start in range(0, len(rows), settings.batch_size):
            chosen = order[start : start + settings.batch_size]
            loss = ce_loss(
                torch.tensor([targets[i] for i in chosen]),
                student.head_probs(student.encode([rows[i] for i in chosen])),
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    student.eval()
    return student


def linear_probe(spec: JobSpec, task: Task, few_shot: list[Example], settings: BaselineSettings) -> RetrievalStudent:
    """The pretrained encoder frozen; only the head trained (full batch, student.head_lr)."""
    torch.manual_seed(spec.student.seed)
    student = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    rows, targets = labelled_rows(task, few_shot)
    z = torch.from_numpy(student.embed_all(rows))
    gold = torch.tensor(targets)
    optimiser = torch.optim.AdamW(
        student.head.parameters(), lr=settings.probe_lr, weight_decay=spec.student.weight_decay
    )
    for _ in range(settings.probe_epochs):
        loss = ce_loss(gold, student.head_probs(z))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return student


def _setfit_text(tokenizer, row: tuple[str, str | None]) -> str:
    """SetFit encodes single texts: a pair is joined by the encoder's separator token."""
    text_a, text_b = row
    return text_a if text_b is None else f"{text_a} {tokenizer.sep_token} {text_b}"


def setfit_student(
    spec: JobSpec, task: Task, few_shot: list[Example], evaluation: list[Example], settings: BaselineSettings
) -> np.ndarray:
    """SetFit on the student's pretrained weights; task-level probabilities on the evaluation examples."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from retrikt_ray.models import student_path

    model = SetFitModel.from_pretrained(
        student_path(spec.student.model), trust_remote_code=spec.student.trust_remote_code
    )
    model.model_body.max_seq_length = spec.student.max_length
    tokenizer = model.model_body.tokenizer
    rows, targets = labelled_rows(task, few_shot)
    train = Dataset.from_dict({"text": [_setfit_text(tokenizer, row) for row in rows], "label": targets})
    with tempfile.TemporaryDirectory() as scratch:  # SetFit's Trainer writes checkpoints and logs under output_dir
        arguments = TrainingArguments(
            output_dir=scratch,
            logging_dir=scratch,
            save_strategy="no",
            batch_size=settings.setfit_batch_size,
            num_epochs=settings.setfit_epochs,
            num_iterations=settings.setfit_iterations,
            seed=spec.student.seed,
            report_to="none",
            show_progress_bar=False,
        )
        Trainer(model=model, args=arguments, train_dataset=train).train()
    evaluation_rows, _ = labelled_rows(task, evaluation)
    probs = model.predict_proba([_setfit_text(tokenizer, row) for row in evaluation_rows], as_numpy=True)
    # The head's classes are the targets seen in training, in sorted order: place them by value.
    full = np.zeros((len(evaluation_rows), task.student_num_labels), dtype=np.float32)
    full[:, np.asarray(model.model_head.classes_, dtype=int)] = probs
    return example_probs(task, full, len(evaluation))


@torch.no_grad()
def tuned_prompt_teacher(
    teacher, soft_prompt: torch.Tensor, examples: list[Example], batch_size: int = 16
) -> np.ndarray:
    """Raw p(y | x) of the teacher with its soft prompt: softmax over labels of log p(text of x | [P] prompt of y).

    The text is the one stage 1 trained the prompt to write (`task.generation_text`), so the classifier
    asks exactly what the tuned prompt learned. Calibrate it with `teacher.calibrate` like p_C.
    """
    task, tokenizer = teacher.task, teacher.tokenizer
    sequences = [
        tokenizer(task.generation_text(example) + "\n", add_special_tokens=False).input_ids for example in examples
    ]
    scores = np.zeros((len(examples), task.num_labels), dtype=np.float64)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        ids = ids.to(teacher.device)
        for label in range(task.num_labels):
            # Right padding: a causal model's scores of the real tokens do not see the pads after them.
            logprobs, _ = teacher.continuation_outputs(label, ids, soft_prompt)
            scores[start : start + len(chunk), label] = (logprobs.cpu().double() * mask.double()).sum(dim=1).numpy()
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)
