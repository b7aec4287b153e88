"""Tasks: what an example is, how to load a split, and how teacher and student see an example.

A task is declared by a `TaskSpec`. The built-ins (sst2, rte, cb, copa) fill in every field; a user may
override any of them. Any other name is a custom task, declared entirely by its spec fields.

Two kinds of task:
- classification: one label per example; the teacher predicts a verbaliser word after a prompt.
- choice: pick one of several alternatives (COPA); the teacher scores each alternative as the
  continuation of the premise joined to it by a connective, the student scores (context, alternative)
  rows as wrong (0) or right (1).
"""

from __future__ import annotations

import copy
import csv
import gzip
import json
import random
import re
import string
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import JobSpec, SpecError, TaskSpec

DATA_DIR = Path(__file__).parent / "data"
# What reading a damaged .gz raises: not gzip at all or a bad CRC, cut short, damaged compressed data.
UNREADABLE_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)

_ENTAILMENT_TEMPLATE = '{premise}\nQuestion: Does this imply that "{hypothesis}"? %s'

BUILTIN_TASKS: dict[str, dict] = {
    "sst2": dict(
        kind="classification",
        description="Movie review sentences and their sentiment",
        format="tsv",
        text_fields=["sentence"],
        label_field="label",
        label_values=["0", "1"],
        label_names=["negative", "positive"],
        verbalisers=["negative", "positive"],
        generation_template="{sentence}",
        classification_template=(
            "Classify the sentiment of this movie review as positive or negative.\n\nReview: {sentence}"
        ),
        answer_prefix="The sentiment of the review is",
    ),
    "rte": dict(
        kind="classification",
        description="Pairs of a premise and a hypothesis that the premise entails or not",
        format="jsonl",
        text_fields=["premise", "hypothesis"],
        label_field="label",
        label_values=["entailment", "not_entailment"],
        label_names=["entailment", "not_entailment"],
        verbalisers=["yes", "no"],
        generation_template="Premise: {premise} Hypothesis: {hypothesis}",
        classification_template=_ENTAILMENT_TEMPLATE % "Yes or no?",
    ),
    "cb": dict(
        kind="classification",
        description="Pairs of a premise and a hypothesis that the premise entails, contradicts or neither",
        format="jsonl",
        text_fields=["premise", "hypothesis"],
        label_field="label",
        label_values=["entailment", "contradiction", "neutral"],
        label_names=["entailment", "contradiction", "neutral"],
        verbalisers=["yes", "no", "maybe"],
        generation_template="Premise: {premise} Hypothesis: {hypothesis}",
        classification_template=_ENTAILMENT_TEMPLATE % "Yes, no, or maybe?",
    ),
    "copa": dict(
        kind="choice",
        description="Everyday events with two alternatives, one being the more plausible cause or effect",
        format="jsonl",
        text_fields=["premise"],
        choice_fields=["choice1", "choice2"],
        question_field="question",
        connectives={"cause": "because", "effect": "so"},
        label_field="label",
        label_values=["0", "1"],
        label_names=["1", "2"],
        verbalisers=["1", "2"],
        generation_template="Premise: {premise} Question: {question} Alternative 1: {choice1} Alternative 2: {choice2}",
    ),
}

# (train, dev) file names under data/<task>/; the large training files ship gzipped.
_PACKAGED_FILES = {
    "sst2": ("train.tsv.gz", "dev.tsv"),
    "rte": ("train.jsonl.gz", "val.jsonl"),
    "cb": ("train.jsonl", "val.jsonl"),
    "copa": ("train.jsonl", "val.jsonl"),
}

_CUSTOM_REQUIRED = ("format", "text_fields", "label_field", "label_values", "description")


@dataclass(frozen=True)
class Example:
    """One example of a task.

    `fields` holds the text fields (for choice tasks also the alternatives and the question field),
    whitespace-normalised. `label` indexes `task.label_names` (-1 when unknown). `source` is
    "path:line" for a loaded example and "" for a generated one.
    """

    fields: dict[str, str]
    label: int
    source: str = ""


def normalise(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


class _Template:
    """A text with {field} slots, parsed once: rendered forwards, and matched backwards by its literals."""

    def __init__(self, text: str, where: str, known: list[str]):
        self.text = text
        self.parts: list[tuple[str, str | None]] = []  # (literal before, slot or None for the tail)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as error:
            raise SpecError(f"{where}: {error}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                if field not in known:
                    raise SpecError(f"{where}: slot {{{field}}} is not one of the task's fields {known}")
                if spec or conversion:
                    raise SpecError(f"{where}: slot {{{field}}} may not carry a format spec or conversion")
            self.parts.append((literal, field))
        self.fields = [field for _, field in self.parts if field is not None]

    def render(self, values: dict[str, str]) -> str:
        return "".join(literal + (values[field] if field is not None else "") for literal, field in self.parts)

    def split_lead(self) -> tuple[str, _Template]:
        """(the literal before the first slot, stripped; the template from that slot on)."""
        (lead, first), *others = self.parts
        rest = copy.copy(self)
        rest.parts = [("", first), *others]
        return lead.strip(), rest

    def check_invertible(self, where: str, required: list[str]) -> None:
        """Every required field exactly once, text between slots, one line (generation stops at a newline)."""
        for field in required:
            if self.fields.count(field) != 1:
                raise SpecError(f"{where}: must contain {{{field}}} exactly once")
        if "\n" in self.text:
            raise SpecError(f"{where}: must be a single line")
        for (literal, field), previous in zip(self.parts[1:], self.parts):
            if field is not None and previous[1] is not None and not literal.strip():
                raise SpecError(f"{where}: slots {{{previous[1]}}} and {{{field}}} need text between them")

    def match(self, text: str) -> dict[str, str] | None:
        """Recover the slot values from a rendered text, or None when the literals are not found."""
        pattern = ""
        for literal, field in self.parts:
            words = literal.split()
            pattern += r"\s*" + r"\s+".join(map(re.escape, words)) + r"\s*" if words else r"\s*"
            if field is not None:
                pattern += "(.*?)"
        found = re.fullmatch(pattern, text, flags=re.DOTALL)
        if found is None:
            return None
        return {field: normalise(value) for field, value in zip(self.fields, found.groups())}


class Task:
    """A resolved task. Build it with `Task.from_spec(spec)`; `task.spec` is the resolved `TaskSpec`."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.description = spec.description
        self.label_names = list(spec.label_names)
        self.verbalisers = list(spec.verbalisers)
        self.num_labels = len(self.label_names)
        self.text_fields = list(spec.text_fields)
        self.choice_fields = list(spec.choice_fields or [])
        self.question_field = spec.question_field
        self.connectives = dict(spec.connectives or {})
        question = [self.question_field] if self.question_field else []
        self._input_fields = self.text_fields + question + self.choice_fields
        self._validate()

        known = self._input_fields
        self._generation_template = _Template(spec.generation_template, "task.generation_template", known)
        self._generation_template.check_invertible("task.generation_template", known)
        # The teacher is handed the template's opening literal ("Premise:") and writes from the first
        # field on: a small teacher rarely opens a pair with the right marker by itself.
        self._generation_lead, self._written_template = self._generation_template.split_lead()
        self._classification_template = None
        if spec.classification_template is not None:
            self._classification_template = _Template(
                spec.classification_template, "task.classification_template", known
            )
        self._student_template = None
        if spec.student_template is not None:
            self._student_template = _Template(spec.student_template, "task.student_template", known)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Task:
        """Merge the user's fields over the built-in's (if any), fill in the defaults, validate."""
        user = {key: value for key, value in spec.model_dump().items() if value is not None}
        builtin = BUILTIN_TASKS.get(spec.name)
        if builtin is None:
            for field in _CUSTOM_REQUIRED:
                if field not in user:
                    raise SpecError(f"task.{field}: required for a custom task")
        merged = {"kind": "classification", **(builtin or {}), **user}

        merged.setdefault("label_names", list(merged["label_values"]))
        merged.setdefault("verbalisers", list(merged["label_names"]))
        if "generation_template" not in merged:
            merged["generation_template"] = _default_generation_template(merged)
        if merged["kind"] == "classification" and "classification_template" not in merged:
            answers = " or ".join(merged["verbalisers"])
            merged["classification_template"] = merged["generation_template"] + f"\nIs it {answers}?"
        merged.setdefault("answer_prefix", "Answer:")
        return cls(TaskSpec(**merged))

    def _validate(self) -> None:
        spec = self.spec
        if not spec.description.strip():
            raise SpecError("task.description: must not be empty")
        if not self.text_fields:
            raise SpecError("task.text_fields: needs at least one field")
        if len(spec.label_values) < 2:
            raise SpecError("task.label_values: needs at least two labels")
        for field in ("label_values", "label_names", "verbalisers"):
            values = getattr(spec, field)
            if len(values) != len(spec.label_values):
                raise SpecError(f"task.{field}: {len(values)} given for {len(spec.label_values)} label_values")
            if len(set(values)) != len(values):
                raise SpecError(f"task.{field}: values must be distinct")
        if self.kind == "classification":
            for word in self.verbalisers:
                if word.split() != [word]:
                    raise SpecError(f"task.verbalisers: '{word}' is not a single word")
            for field in ("choice_fields", "question_field", "connectives"):
                if getattr(spec, field) is not None:
                    raise SpecError(f"task.{field}: only choice tasks use it")
        else:
            if len(self.choice_fields) < 2:
                raise SpecError("task.choice_fields: a choice task needs at least two")
            if len(spec.label_values) != len(self.choice_fields):
                raise SpecError(
                    f"task.label_values: a choice task has one label per choice field ({len(self.choice_fields)})"
                )
            if self.question_field is not None and not self.connectives:
                raise SpecError("task.connectives: required when question_field is set")
            if self.connectives and self.question_field is None:
                raise SpecError("task.question_field: required when connectives are set")
            if spec.student_template is not None:
                raise SpecError("task.student_template: only classification tasks use it")
        if len(set(self._input_fields)) != len(self._input_fields):
            raise SpecError("task.text_fields: the text, choice and question fields must all differ")
        if spec.label_field in self._input_fields:
            raise SpecError(f"task.label_field: '{spec.label_field}' is also an input field")
        if spec.columns is not None:
            if spec.format == "jsonl":
                raise SpecError("task.columns: only tsv and csv files use it (a jsonl row names its fields)")
            if len(set(spec.columns)) != len(spec.columns) or not all(name.strip() for name in spec.columns):
                raise SpecError("task.columns: names must be distinct and not empty")
            for field in [*self._input_fields, spec.label_field]:
                if field not in spec.columns:
                    raise SpecError(f"task.columns: no column '{field}' in {spec.columns}")

    @property
    def input_fields(self) -> list[str]:
        """Every field an example carries: the text fields, the question field, then the alternatives."""
        return list(self._input_fields)

    # ---------------------------------------------------------------------------------- loading
    def default_files(self) -> tuple[str, str]:
        """The packaged (train, dev) files of a built-in task."""
        if self.name not in _PACKAGED_FILES:
            raise SpecError(
                f"data.train_file: custom task '{self.name}' has no packaged data; set train_file and dev_file"
            )
        train, dev = _PACKAGED_FILES[self.name]
        return str(DATA_DIR / self.name / train), str(DATA_DIR / self.name / dev)

    def load(self, path: str | Path, labelled: bool = True, file_format: str | None = None) -> list[Example]:
        """Read a jsonl, tsv or csv file (optionally .gz, UTF-8 with or without a byte-order mark) into examples;
        a bad row raises `path:line: ...`. A tsv or csv file's first line is its header, unless `task.columns`
        names the columns. With `labelled` False the label field is not needed, and ignored where present
        (labels -1). `file_format` reads a file in another format than the task's (task.columns then do not
        apply)."""
        path = str(path)
        if not Path(path).is_file():
            raise SpecError(f"{path}: file not found")
        file_format = file_format or self.spec.format
        needed = self._input_fields + ([self.spec.label_field] if labelled else [])
        names = self.spec.columns if file_format == self.spec.format else None
        table = dict(needed=needed, names=names, label_values=self.spec.label_values)
        examples = []
        try:
            with _open_text(path) as handle:
                if file_format == "jsonl":
                    rows = _jsonl_rows(handle, path)
                elif file_format == "tsv":
                    # QUOTE_NONE: GLUE tsv files hold bare quote characters inside sentences
                    rows = _table_rows(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), path, **table)
                else:
                    rows = _table_rows(csv.reader(handle), path, **table)
                for line, record in rows:
                    examples.append(self._example(record, f"{path}:{line}", labelled))
        except UnicodeDecodeError as error:
            raise SpecError(f"{path}: not UTF-8 text ({error.reason})") from None
        except UNREADABLE_GZIP as error:
            raise SpecError(f"{path}: not a readable gzip file ({error})") from None
        if not examples:
            raise SpecError(f"{path}: no examples")
        return examples

    def _example(self, record: dict, source: str, labelled: bool = True) -> Example:
        fields = {}
        for field in self._input_fields:
            if field not in record:
                raise SpecError(f"{source}: missing field '{field}'")
            if not isinstance(record[field], str):
                raise SpecError(f"{source}: field '{field}' is not a string")
            fields[field] = normalise(record[field])
        question = fields.get(self.question_field)
        if self.question_field and question not in self.connectives:
            raise SpecError(f"{source}: {self.question_field} '{question}' is not one of {list(self.connectives)}")
        if not labelled:
            return Example(fields, -1, source)
        label_field = self.spec.label_field
        if label_field not in record:
            raise SpecError(f"{source}: missing field '{label_field}'")
        raw_label = record[label_field]
        raw_label = raw_label if isinstance(raw_label, str) else json.dumps(raw_label)
        if raw_label not in self.spec.label_values:
            raise SpecError(f"{source}: label '{raw_label}' is not one of {self.spec.label_values}")
        return Example(fields, self.spec.label_values.index(raw_label), source)

    # ------------------------------------------------------------------------------- few shots
    def few_shot(self, examples: list[Example], k: int, seed: int) -> list[Example]:
        """Draw the labelled few shots: k per class (classification) or k in total (choice), shuffled."""
        rng = random.Random(seed)
        labelled = [example for example in examples if example.label >= 0]
        if self.kind == "choice":
            if len(labelled) < k:
                raise SpecError(f"data.shots: {k} shots asked, only {len(labelled)} labelled examples")
            return rng.sample(labelled, k)
        shots = []
        for label, name in enumerate(self.label_names):
            pool = [example for example in labelled if example.label == label]
            if len(pool) < k:
                raise SpecError(f"data.shots: {k} shots per class asked, class '{name}' has only {len(pool)}")
            shots.extend(rng.sample(pool, k))
        rng.shuffle(shots)
        return shots

    # ------------------------------------------------------------------------------ generation
    def generation_prompt(self, label: int) -> str:
        """The text that precedes a generated example of `label` (after the soft prompt); it ends with
        the generation template's opening literal, if any."""
        lead = f" {self._generation_lead}" if self._generation_lead else ""
        return f"Task: {self.description}. Label: {self.verbalisers[label]}. Text:{lead}"

    def generation_text(self, example: Example) -> str:
        """The example as the teacher learns to write it after `generation_prompt`, with a leading space."""
        return " " + self._written_template.render(example.fields)

    def example_text(self, example: Example) -> str:
        """The example as one line: the whole generation template, opening literal included."""
        return self._generation_template.render(example.fields)

    def parse_generation(self, text: str, label: int) -> Example | None:
        """Recover an example from what the teacher wrote after `generation_prompt`; None when it does not parse."""
        text = text.split("\n", 1)[0]
        for marker in ("Task:", "Label:"):  # the model went on to write a new example
            text = text.split(marker, 1)[0]
        text = text.strip()
        if self._generation_lead:  # the teacher repeated the opening literal it was handed
            text = text.removeprefix(self._generation_lead).strip()
        fields = self._written_template.match(text)
        if fields is None or not all(fields.values()):
            return None
        if self.question_field and fields[self.question_field] not in self.connectives:
            return None
        return Example(fields, label)

    # --------------------------------------------------------------------------------- teacher
    def classification_prompt(self, example: Example) -> str:
        """Classification tasks: the question to the teacher (its user turn); the teacher's answer
        starts with `spec.answer_prefix`, then the verbaliser."""
        if self._classification_template is None:
            raise ValueError(f"task '{self.name}' is a choice task: use choice_contexts")
        return self._classification_template.render(example.fields)

    def choice_contexts(self, example: Example) -> list[tuple[str, str]]:
        """Choice tasks: (context, continuation) per alternative, for scoring the continuation's log-prob."""
        context = self._choice_context(example)
        return [(context, " " + example.fields[field]) for field in self.choice_fields]

    def _choice_context(self, example: Example) -> str:
        premise = " ".join(example.fields[field] for field in self.text_fields)
        if self.question_field is None:
            return premise
        return premise + " " + self.connectives[example.fields[self.question_field]]

    # --------------------------------------------------------------------------------- student
    def student_inputs(self, example: Example) -> list[tuple[str, str | None]]:
        """What the student encodes, one (text_a, text_b) per row: one row, or one per alternative."""
        if self.kind == "choice":
            context = self._choice_context(example)
            return [(context, example.fields[field]) for field in self.choice_fields]
        if self._student_template is not None:
            return [(self._student_template.render(example.fields), None)]
        texts = [example.fields[field] for field in self.text_fields]
        if len(texts) == 1:
            return [(texts[0], None)]
        return [(texts[0], " ".join(texts[1:]))]

    def row_targets(self, example: Example) -> list[int]:
        """Gold target of each student row: the label, or 1 for the right alternative and 0 otherwise."""
        if self.kind == "choice":
            return [int(index == example.label) for index in range(len(self.choice_fields))]
        return [example.label]

    def row_soft_labels(self, soft_label: np.ndarray) -> np.ndarray:
        """Soft label of each student row (rows, student_num_labels) from an example's soft label: the soft label
        itself, or for a choice task each alternative's (1 - q(i), q(i)), the soft label of "it is the right one"."""
        soft_label = np.asarray(soft_label, dtype=np.float32)
        if self.kind == "classification":
            return soft_label[None, :]
        return np.array([[1 - soft_label[row], soft_label[row]] for row in range(len(self.choice_fields))], np.float32)

    @property
    def student_num_labels(self) -> int:
        """Classes of the student's head: the labels, or (wrong, right) for a choice task."""
        return 2 if self.kind == "choice" else self.num_labels


def _default_generation_template(fields: dict) -> str:
    text_fields = list(fields["text_fields"])
    question = [fields["question_field"]] if fields.get("question_field") else []
    if fields["kind"] == "classification" and len(text_fields) == 1:
        return f"{{{text_fields[0]}}}"
    parts = [f"{_title(field)}: {{{field}}}" for field in text_fields + question]
    choices = fields.get("choice_fields") or []
    parts += [f"Alternative {number}: {{{field}}}" for number, field in enumerate(choices, 1)]
    return " ".join(parts)


def _title(field: str) -> str:
    return field.replace("_", " ").title()


def _open_text(path: str):
    """The file as text; utf-8-sig drops the byte-order mark that spreadsheet exports (and MRPC) start with."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _jsonl_rows(handle, path: str) -> Iterator[tuple[int, dict]]:
    for line, text in enumerate(handle, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{path}:{line}: bad JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise SpecError(f"{path}:{line}: expected a JSON object, found {type(record).__name__}")
        yield line, record


def _table_rows(
    reader, path: str, needed: list[str], names: list[str] | None, label_values: list[str]
) -> Iterator[tuple[int, dict]]:
    """Rows of a table keyed by column name, with the line each row starts on. The names are `names`
    (task.columns: the file has no header line; a first line that repeats them is skipped), else the first row's."""
    header = names
    first = True
    previous_end = 0
    try:
        for row in reader:
            line, previous_end = previous_end + 1, reader.line_num  # a quoted csv row may span lines
            if not row:
                continue
            if first:
                first = False
                if names is None:
                    header = row
                    _check_header(header, path, line, needed, label_values)
                    continue
                if row == names:
                    continue
            if len(row) != len(header):
                named = " (task.columns)" if names is not None else ""
                raise SpecError(f"{path}:{line}: expected {len(header)} columns{named}, found {len(row)}")
            yield line, dict(zip(header, row))
    except csv.Error as error:
        raise SpecError(f"{path}:{reader.line_num}: {error}") from None


def _check_header(header: list[str], path: str, line: int, needed: list[str], label_values: list[str]) -> None:
    """Every needed field is a column of the header; when one is not and the header looks like a data row
    (a cell that is a label value, a number or several words), the error says to name the columns."""
    for field in needed:
        if field in header:
            continue
        if any(_looks_like_a_value(cell, label_values) for cell in header):
            raise SpecError(
                f"{path}:{line}: the first line looks like data, not a header (no column '{field}'): "
                "for a file without a header line, name its columns with task.columns"
            )
        raise SpecError(f"{path}:{line}: missing field '{field}' (the header has {header})")


def _looks_like_a_value(cell: str, label_values: list[str]) -> bool:
    text = cell.strip()
    if text in label_values or len(text.split()) > 3:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def data_files(spec: JobSpec, task: Task) -> tuple[str, str]:
    """(train, dev) files of a job: the spec's, else the task's packaged ones."""
    return train_file(spec, task), dev_file(spec, task)


def train_file(spec: JobSpec, task: Task) -> str:
    """The job's labelled pool: data.train_file, else the task's packaged one (reading no other field, so that a
    stage that reads only this file reads only data.train_file: stage_contract)."""
    return spec.data.train_file or task.default_files()[0]


def dev_file(spec: JobSpec, task: Task) -> str:
    """The job's dev split: data.dev_file, else the task's packaged one."""
    return spec.data.dev_file or task.default_files()[1]


def load_few_shot(spec: JobSpec) -> tuple[Task, list[Example]]:
    """The task and its few labelled examples D_L (k per class, drawn with the data seed)."""
    task = Task.from_spec(spec.task)
    return task, task.few_shot(task.load(train_file(spec, task)), spec.data.shots, spec.data.seed)


def load_dev(spec: JobSpec) -> tuple[Task, list[Example]]:
    """The task and its evaluation examples (the first data.dev_limit when set)."""
    task = Task.from_spec(spec.task)
    return task, task.load(dev_file(spec, task))[: spec.data.dev_limit]


def read_text_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file (optionally .gz), UTF-8 with or without a byte-order mark."""
    try:
        with _open_text(str(path)) as handle:
            for number, line in enumerate(handle, 1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text ({error.reason})") from None
    except UNREADABLE_GZIP as error:
        raise SpecError(f"{path}: not a readable gzip file ({error})") from None


def text_key(example: Example) -> str:
    """What makes two inputs the same text: their fields, case aside."""
    return json.dumps({name: value.lower() for name, value in example.fields.items()}, sort_keys=True)


def screen_texts(
    task: Task, texts: list[Example], excluded: dict[str, list[Example]], min_words: int
) -> tuple[list[Example], Counter]:
    """The texts worth labelling, in order: a text equal to one of `excluded`'s examples is skipped under that
    reason (e.g. in_dev_set), then repeats (`duplicate`) and texts under `min_words` words (`too_short`).
    Returns (eligible, Counter of skip reasons)."""
    excluded_keys = {reason: {text_key(example) for example in examples} for reason, examples in excluded.items()}
    skipped: Counter = Counter()
    eligible, seen = [], set()
    for example in texts:
        key = text_key(example)
        reason = next((reason for reason, keys in excluded_keys.items() if key in keys), None)
        if reason is not None:
            skipped[reason] += 1
        elif key in seen:
            skipped["duplicate"] += 1
        elif len(" ".join(example.fields[field] for field in task.input_fields).split()) < min_words:
            skipped["too_short"] += 1
        else:
            seen.add(key)
            eligible.append(example)
    return eligible, skipped


def draw(examples: list, count: int | None, seed: int) -> list:
    """`count` of the examples (all when None), drawn with `seed`, in their original order."""
    if count is None or count >= len(examples):
        return list(examples)
    order = np.random.default_rng(seed).permutation(len(examples))[:count]
    return [examples[index] for index in np.sort(order)]
