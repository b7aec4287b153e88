"""Tasks: packaged data, few-shot draws, generation round trips, custom tasks and loader errors."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter

import pytest

from retrikt_ray.config import SpecError, TaskSpec
from retrikt_ray.tasks import BUILTIN_TASKS, Example, Task


def task(name: str, **fields) -> Task:
    return Task.from_spec(TaskSpec(name=name, **fields))


# (train rows, train label counts, dev rows, dev label counts), counts keyed by label name
PACKAGED = {
    "sst2": (67349, {"negative": 29780, "positive": 37569}, 872, {"negative": 428, "positive": 444}),
    "rte": (2490, {"entailment": 1249, "not_entailment": 1241}, 277, {"entailment": 146, "not_entailment": 131}),
    "cb": (
        250,
        {"entailment": 115, "contradiction": 119, "neutral": 16},
        56,
        {"entailment": 23, "contradiction": 28, "neutral": 5},
    ),
    "copa": (400, {"1": 195, "2": 205}, 100, {"1": 55, "2": 45}),
}


@pytest.fixture(scope="module")
def packaged():
    """Each built-in task with its loaded (train, dev) examples."""
    loaded = {}
    for name in PACKAGED:
        t = task(name)
        train, dev = t.default_files()
        loaded[name] = (t, t.load(train), t.load(dev))
    return loaded


# ------------------------------------------------------------------------------------ built-ins
@pytest.mark.parametrize("name", list(PACKAGED))
def test_packaged_splits_have_published_sizes_and_labels(packaged, name):
    t, train, dev = packaged[name]
    train_rows, train_counts, dev_rows, dev_counts = PACKAGED[name]
    assert len(train) == train_rows and len(dev) == dev_rows
    assert Counter(t.label_names[e.label] for e in train) == train_counts
    assert Counter(t.label_names[e.label] for e in dev) == dev_counts


def test_loaded_example_fields_and_source(packaged):
    t, _, dev = packaged["sst2"]
    first = dev[0]
    assert first.fields == {"sentence": "it 's a charming and often affecting journey ."}
    assert first.label == 1
    assert first.source == f"{t.default_files()[1]}:2"  # line 1 is the header
    copa, _, copa_dev = packaged["copa"]
    assert copa_dev[0].fields == {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
    }
    assert copa_dev[0].label == 1


def test_builtin_attributes():
    sst2 = task("sst2")
    assert (sst2.kind, sst2.num_labels, sst2.student_num_labels) == ("classification", 2, 2)
    assert sst2.verbalisers == ["negative", "positive"]
    assert task("rte").verbalisers == ["yes", "no"]
    assert task("cb").verbalisers == ["yes", "no", "maybe"]
    copa = task("copa")
    assert (copa.kind, copa.label_names, copa.student_num_labels) == ("choice", ["1", "2"], 2)
    assert copa.spec.connectives == {"cause": "because", "effect": "so"}


def test_user_fields_override_builtin():
    t = task("sst2", verbalisers=["bad", "good"], description="Short film reviews")
    assert t.verbalisers == ["bad", "good"]
    assert t.spec.label_names == ["negative", "positive"]  # the rest stays built-in
    assert t.generation_prompt(0) == "Task: Short film reviews. Label: bad. Text:"  # docs/method.md: Label: <v(y)>


def test_prompts():
    sst2 = task("sst2")
    example = Example({"sentence": "a fine film ."}, 1)
    assert sst2.generation_prompt(1) == "Task: Movie review sentences and their sentiment. Label: positive. Text:"
    assert sst2.generation_text(example) == " a fine film ."
    assert sst2.classification_prompt(example) == (
        "Classify the sentiment of this movie review as positive or negative.\n\nReview: a fine film ."
    )
    assert sst2.spec.answer_prefix == "The sentiment of the review is"
    rte = task("rte")
    pair = Example({"premise": "A dog runs.", "hypothesis": "An animal moves."}, 0)
    # The teacher is handed the template's opening literal and writes the rest.
    assert rte.generation_prompt(0).endswith(". Label: yes. Text: Premise:")
    assert rte.generation_text(pair) == " A dog runs. Hypothesis: An animal moves."
    assert rte.example_text(pair) == "Premise: A dog runs. Hypothesis: An animal moves."
    assert rte.classification_prompt(pair) == (
        'A dog runs.\nQuestion: Does this imply that "An animal moves."? Yes or no?'
    )
    assert rte.student_inputs(pair) == [("A dog runs.", "An animal moves.")]
    assert rte.row_targets(pair) == [0]


def test_copa_choice_rows():
    copa = task("copa")
    example = Example(
        {
            "premise": "The man turned on the faucet.",
            "choice1": "The toilet filled with water.",
            "choice2": "Water flowed from the spout.",
            "question": "effect",
        },
        1,
    )
    assert copa.generation_prompt(1).endswith("Label: 2. Text: Premise:")
    assert copa.generation_text(example) == (
        " The man turned on the faucet. Question: effect"
        " Alternative 1: The toilet filled with water. Alternative 2: Water flowed from the spout."
    )
    assert copa.choice_contexts(example) == [
        ("The man turned on the faucet. so", " The toilet filled with water."),
        ("The man turned on the faucet. so", " Water flowed from the spout."),
    ]
    assert copa.student_inputs(example) == [
        ("The man turned on the faucet. so", "The toilet filled with water."),
        ("The man turned on the faucet. so", "Water flowed from the spout."),
    ]
    assert copa.row_targets(example) == [0, 1]
    cause = Example({**example.fields, "question": "cause"}, 0)
    assert copa.student_inputs(cause)[0][0] == "The man turned on the faucet. because"
    assert copa.row_targets(cause) == [1, 0]
    with pytest.raises(ValueError):
        copa.classification_prompt(example)


# ------------------------------------------------------------------------------------ few shots
def test_few_shot_k_per_class_deterministic(packaged):
    for name in ("sst2", "cb"):
        t, train, _ = packaged[name]
        shots = t.few_shot(train, k=8, seed=0)
        assert Counter(e.label for e in shots) == {label: 8 for label in range(t.num_labels)}
        assert t.few_shot(train, k=8, seed=0) == shots
        assert {e.source for e in t.few_shot(train, k=8, seed=1)} != {e.source for e in shots}
        assert t.few_shot(list(train), k=8, seed=0) == shots


def test_few_shot_choice_is_k_in_total(packaged):
    t, train, _ = packaged["copa"]
    shots = t.few_shot(train, k=16, seed=3)
    assert len(shots) == 16 and len({e.source for e in shots}) == 16
    assert t.few_shot(train, k=16, seed=3) == shots
    assert t.few_shot(train, k=16, seed=4) != shots


def test_few_shot_too_few_in_a_class(packaged):
    t, train, _ = packaged["cb"]
    with pytest.raises(SpecError, match="class 'neutral' has only 16"):
        t.few_shot(train, k=17, seed=0)


# ------------------------------------------------------------------------------- generation text
@pytest.mark.parametrize("name", list(PACKAGED))
def test_generation_round_trip_builtin(packaged, name):
    t, _, dev = packaged[name]
    for example in dev[:50]:
        parsed = t.parse_generation(t.generation_text(example), example.label)
        assert parsed == Example(example.fields, example.label)


def test_parse_generation_cuts_at_newline_and_next_example():
    rte = task("rte")
    text = " Premise: A cat sleeps.  Hypothesis: The cat  is awake.\nPremise: more"
    expected = {"premise": "A cat sleeps.", "hypothesis": "The cat is awake."}
    assert rte.parse_generation(text, 1).fields == expected
    text = " Premise: A cat sleeps. Hypothesis: The cat is awake. Task: Pairs of ... Label: entailment"
    assert rte.parse_generation(text, 1) == Example(expected, 1)
    sst2 = task("sst2")
    parsed = sst2.parse_generation(" a warm film . Label: positive. Text: more", 1)
    assert parsed.fields == {"sentence": "a warm film ."}


@pytest.mark.parametrize(
    "name, text",
    [
        ("sst2", ""),
        ("sst2", "   \nsecond line"),
        ("sst2", " Task: Movie reviews"),
        ("rte", " A dog runs. An animal moves."),
        ("rte", " Premise: A dog runs."),
        ("rte", " Premise:  Hypothesis: An animal moves."),
        ("rte", " Premise: A dog runs. Hypothesis: "),
        ("rte", " Hypothesis: An animal moves. Premise: A dog runs."),
        ("copa", " Premise: It rained. Question: why Alternative 1: A. Alternative 2: B."),
        ("copa", " Premise: It rained. Question: effect Alternative 1: The ground got wet."),
    ],
)
def test_parse_generation_rejects_junk(name, text):
    assert task(name).parse_generation(text, 0) is None


# --------------------------------------------------------------------------------- custom tasks
CUSTOM = dict(
    description="Questions and whether their answer is a number",
    text_fields=["question", "context"],
    label_field="kind",
    label_values=["num", "other"],
)

ROWS = [
    {"question": "How many legs?", "context": "A spider has eight legs.", "kind": "num"},
    {"question": "Who wrote it?", "context": "Tolstoy wrote it.", "kind": "other"},
    {"question": "How old is she?", "context": "She is nine.", "kind": "num"},
]


def write_table(path, delimiter: str, rows=ROWS) -> None:
    header = ["id", "question", "context", "kind"]
    lines = [delimiter.join(header)]
    lines += [delimiter.join([str(i), row["question"], row["context"], row["kind"]]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def write_jsonl(path, rows=ROWS) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_custom_task_from_spec_fields(tmp_path, fmt):
    path = tmp_path / f"qa.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path)
    else:
        write_table(path, "\t" if fmt == "tsv" else ",")
    t = task("qa", format=fmt, **CUSTOM)
    assert t.kind == "classification"
    assert t.label_names == ["num", "other"] and t.verbalisers == ["num", "other"]
    assert t.spec.generation_template == "Question: {question} Context: {context}"
    assert t.spec.classification_template == "Question: {question} Context: {context}\nIs it num or other?"
    examples = t.load(path)
    assert [e.label for e in examples] == [0, 1, 0]
    assert examples[1].fields == {"question": "Who wrote it?", "context": "Tolstoy wrote it."}
    assert examples[2].source == f"{path}:{3 if fmt == 'jsonl' else 4}"
    assert t.student_inputs(examples[0]) == [("How many legs?", "A spider has eight legs.")]
    assert t.classification_prompt(examples[0]) == (
        "Question: How many legs? Context: A spider has eight legs.\nIs it num or other?"
    )
    for example in examples:
        assert t.parse_generation(t.generation_text(example), example.label) == Example(example.fields, example.label)
    assert Counter(e.label for e in t.few_shot(examples, k=1, seed=0)) == {0: 1, 1: 1}


def test_custom_task_single_field_gzip_and_names(tmp_path):
    path = tmp_path / "spam.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"body": "win money now", "y": 1}) + "\n")
        handle.write(json.dumps({"body": "lunch at noon?", "y": 0}) + "\n")
    t = task(
        "spam",
        format="jsonl",
        description="Short messages",
        text_fields=["body"],
        label_field="y",
        label_values=["0", "1"],
        label_names=["ham", "spam"],
    )
    assert t.verbalisers == ["ham", "spam"]
    assert t.spec.generation_template == "{body}"
    assert t.spec.classification_template == "{body}\nIs it ham or spam?"
    examples = t.load(path)
    assert [e.label for e in examples] == [1, 0]
    assert t.generation_prompt(1) == "Task: Short messages. Label: spam. Text:"
    assert t.generation_text(examples[0]) == " win money now"
    assert t.parse_generation(" win money now\n", 1) == Example({"body": "win money now"}, 1)
    assert t.student_inputs(examples[0]) == [("win money now", None)]


def test_custom_choice_task(tmp_path):
    path = tmp_path / "pick.jsonl"
    write_jsonl(path, [{"goal": "Open a jar.", "a": "Twist the lid.", "b": "Eat the lid.", "answer": "a"}])
    t = task(
        "pick",
        kind="choice",
        format="jsonl",
        description="Goals and two ways to reach them",
        text_fields=["goal"],
        choice_fields=["a", "b"],
        label_field="answer",
        label_values=["a", "b"],
    )
    assert t.spec.generation_template == "Goal: {goal} Alternative 1: {a} Alternative 2: {b}"
    (example,) = t.load(path)
    assert t.choice_contexts(example) == [("Open a jar.", " Twist the lid."), ("Open a jar.", " Eat the lid.")]
    assert t.row_targets(example) == [1, 0]
    assert t.parse_generation(t.generation_text(example), 0) == Example(example.fields, 0)


def test_custom_templates_are_used():
    t = task(
        "qa",
        format="jsonl",
        **CUSTOM,
        generation_template="Q: {question} C: {context}",
        student_template="{question} [SEP] {context}",
    )
    example = Example({"question": "Why?", "context": "Because."}, 1)
    assert t.generation_prompt(1).endswith("Text: Q:")
    assert t.generation_text(example) == " Why? C: Because."
    assert t.parse_generation(" Why? C: Because.", 1) == example
    assert t.parse_generation(" Q: Why? C: Because.", 1) == example  # the opening literal repeated
    assert t.student_inputs(example) == [("Why? [SEP] Because.", None)]


@pytest.mark.parametrize("missing", ["format", "text_fields", "label_field", "label_values", "description"])
def test_custom_task_required_fields(missing):
    fields = {"format": "jsonl", **CUSTOM}
    del fields[missing]
    with pytest.raises(SpecError, match=rf"^task\.{missing}: required for a custom task$"):
        task("qa", **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(label_names=["a"]), "task.label_names: "),
        (dict(verbalisers=["a", "b", "c"]), "task.verbalisers: "),
        (dict(verbalisers=["a number", "other"]), "task.verbalisers: 'a number' is not a single word"),
        (dict(label_values=["num"], label_names=["num"]), "task.label_values: "),
        (dict(generation_template="Q: {question} {title}"), "task.generation_template: slot {title}"),
        (dict(generation_template="Q: {question}"), "task.generation_template: must contain {context}"),
        (dict(generation_template="{question} {context}"), "task.generation_template: slots"),
        (dict(classification_template="{answer}?"), "task.classification_template: slot {answer}"),
        (dict(kind="choice"), "task.choice_fields: "),
        (dict(kind="choice", choice_fields=["context"], text_fields=["question"]), "task.choice_fields: "),
        (dict(label_field="context"), "task.label_field: 'context' is also an input field"),
        (dict(text_fields=["question", "question"]), "task.text_fields: "),
        (dict(description=" "), "task.description: "),
        (dict(columns=["question", "context", "kind"]), "task.columns: only tsv and csv files use it"),
        (dict(format="tsv", columns=["question", "kind"]), "task.columns: no column 'context' in"),
        (dict(format="csv", columns=["question", "context", "kind", "kind"]), "task.columns: names must be distinct"),
    ],
)
def test_invalid_custom_specs(fields, message):
    with pytest.raises(SpecError) as error:
        task("qa", **{"format": "jsonl", **CUSTOM, **fields})
    assert str(error.value).startswith(message)


def test_default_files_only_for_builtins():
    assert set(BUILTIN_TASKS) == {"sst2", "rte", "cb", "copa"}
    with pytest.raises(SpecError, match="custom task 'qa'"):
        task("qa", format="jsonl", **CUSTOM).default_files()


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.tsv", "qa.csv", "qa.tsv.gz"])
def test_files_starting_with_a_byte_order_mark(tmp_path, name):
    """Spreadsheet exports and MRPC start with a UTF-8 BOM; it is not part of the first field's name."""
    fmt = name.split(".")[1]
    if fmt == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in ROWS)
    else:
        delimiter = "\t" if fmt == "tsv" else ","
        header = ["kind", "question", "context"]  # the label first, as MRPC's Quality
        rows = [header] + [[row[column] for column in header] for row in ROWS]
        text = "".join(delimiter.join(row) + "\r\n" for row in rows)  # CRLF, as spreadsheets write
    data = "\ufeff".encode() + text.encode()
    assert data.startswith(b"\xef\xbb\xbf")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    t = task("qa", format=fmt, **CUSTOM)
    examples = t.load(path)
    assert [e.label for e in examples] == [0, 1, 0]
    assert examples[0].fields == {"question": "How many legs?", "context": "A spider has eight legs."}
    assert [e.fields for e in t.load(path, labelled=False)] == [e.fields for e in examples]


COLA = dict(
    description="Sentences and whether they are grammatical",
    text_fields=["sentence"],
    label_field="label",
    label_values=["0", "1"],
    label_names=["unacceptable", "acceptable"],
)
COLA_COLUMNS = ["source", "label", "original_label", "sentence"]
COLA_ROWS = [  # GLUE's CoLA as distributed: no header line
    ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
    ["gj04", "0", "*", "They drank the pub."],
    ["bc01", "1", "", "The sailors rode the breeze clear of the rocks."],
]


def write_rows(path, fmt: str, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        options = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
        csv.writer(handle, lineterminator="\n", **options).writerows(rows)


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_a_file_without_header_line_is_read_with_task_columns(tmp_path, fmt):
    path = tmp_path / f"cola.{fmt}"
    write_rows(path, fmt, COLA_ROWS)
    t = task("cola", format=fmt, columns=COLA_COLUMNS, **COLA)
    examples = t.load(path)
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[0].fields == {"sentence": COLA_ROWS[0][3]}
    assert examples[0].source == f"{path}:1"  # the first line is data
    assert [e.fields for e in t.load(path, labelled=False)] == [e.fields for e in examples]

    write_rows(path, fmt, [COLA_COLUMNS, *COLA_ROWS])  # a first line that repeats the names is a header
    assert [e.source for e in t.load(path)] == [f"{path}:{line}" for line in (2, 3, 4)]

    write_rows(path, fmt, [*COLA_ROWS, ["gj04", "1", "A row with one column too few."]])
    assert error_of(t, path) == f"{path}:4: expected 4 columns (task.columns), found 3"


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_a_first_line_that_looks_like_data_asks_for_task_columns(tmp_path, fmt):
    path = tmp_path / f"cola.{fmt}"
    write_rows(path, fmt, COLA_ROWS)
    assert error_of(task("cola", format=fmt, **COLA), path) == (
        f"{path}:1: the first line looks like data, not a header (no column 'sentence'): "
        "for a file without a header line, name its columns with task.columns"
    )
    # A header that merely lacks the field keeps naming what the header has.
    write_rows(path, fmt, [["source", "label", "original_label", "text"], *COLA_ROWS])
    assert error_of(task("cola", format=fmt, **COLA), path) == (
        f"{path}:1: missing field 'sentence' (the header has ['source', 'label', 'original_label', 'text'])"
    )


# ---------------------------------------------------------------------------------- bad files
def error_of(t: Task, path) -> str:
    with pytest.raises(SpecError) as error:
        t.load(path)
    return str(error.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    assert error_of(task("rte"), path) == f"{path}: file not found"


@pytest.mark.parametrize(
    "lines, line, reason",
    [
        (['{"premise": "a", "hypothesis": "b", "label": "entailment"}', '{"premise": "a", '], 2, "bad JSON"),
        (['{"premise": "a", "hypothesis": "b", "label": "entailment"}', "", '["a"]'], 3, "expected a JSON object"),
        (['{"premise": "a", "label": "entailment"}'], 1, "missing field 'hypothesis'"),
        (['{"premise": "a", "hypothesis": "b"}'], 1, "missing field 'label'"),
        (
            ['{"premise": "a", "hypothesis": "b", "label": "entailment"}'] * 2
            + ['{"premise": "a", "hypothesis": "b", "label": "maybe"}'],
            3,
            "label 'maybe' is not one of ['entailment', 'not_entailment']",
        ),
        (['{"premise": 3, "hypothesis": "b", "label": "entailment"}'], 1, "field 'premise' is not a string"),
    ],
)
def test_malformed_jsonl_rows(tmp_path, lines, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = error_of(task("rte"), path)
    assert message.startswith(f"{path}:{line}: ")
    assert reason in message


def test_json_int_labels_compare_as_strings(tmp_path):
    path = tmp_path / "copa.jsonl"
    row = {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 1}
    write_jsonl(path, [row, {**row, "label": 2}])
    assert error_of(task("copa"), path) == f"{path}:2: label '2' is not one of ['0', '1']"
    write_jsonl(path, [{**row, "question": "why"}])
    assert error_of(task("copa"), path).startswith(f"{path}:1: question 'why' is not one of")


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("sentence\tlabel\na good film\t1\na bad film\n", 3, "expected 2 columns, found 1"),
        ("sentence\tlabel\na good film\t1\t7\n", 2, "expected 2 columns, found 3"),
        ("sentence\tlabel\na good film\t1\n\na bad film\tnegative\n", 4, "label 'negative' is not one of ['0', '1']"),
        ("text\tlabel\na good film\t1\n", 1, "missing field 'sentence'"),
    ],
)
def test_malformed_tsv_rows(tmp_path, text, line, reason):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    message = error_of(task("sst2"), path)
    assert message.startswith(f"{path}:{line}: ")
    assert reason in message


def test_tsv_keeps_quotes_and_csv_rows_may_span_lines(tmp_path):
    tsv = tmp_path / "quotes.tsv"
    tsv.write_text('sentence\tlabel\n"a film " so good\t1\n')
    assert task("sst2").load(tsv)[0].fields == {"sentence": '"a film " so good'}
    path = tmp_path / "qa.csv"
    path.write_text('question,context,kind\n"How many\nlegs?","Eight, it has.",num\nWho?,Me,bad\n')
    message = error_of(task("qa", format="csv", **CUSTOM), path)
    assert message.startswith(f"{path}:4: label 'bad'")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("sentence\tlabel\n")
    assert error_of(task("sst2"), path) == f"{path}: no examples"


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_crlf_line_endings_read_as_lf_and_count_one_line_each(tmp_path, fmt):
    """Files written on Windows: the same examples as with LF endings, and a bad row's line number counts each
    CRLF once."""
    header = ["question", "context", "kind"]
    if fmt == "jsonl":
        lines = [json.dumps(row) for row in ROWS]
    else:
        delimiter = "\t" if fmt == "tsv" else ","
        lines = [delimiter.join(header)] + [delimiter.join(row[column] for column in header) for row in ROWS]
    path = tmp_path / f"qa.{fmt}"
    path.write_bytes("".join(line + "\r\n" for line in lines).encode())
    t = task("qa", format=fmt, **CUSTOM)
    examples = t.load(path)
    assert [e.fields for e in examples] == [{"question": r["question"], "context": r["context"]} for r in ROWS]
    assert [e.label for e in examples] == [0, 1, 0]
    bad = lines[-1].replace("num", "bad")
    path.write_bytes("".join(line + "\r\n" for line in [*lines, bad]).encode())
    assert error_of(t, path) == f"{path}:{len(lines) + 1}: label 'bad' is not one of ['num', 'other']"


GOOD_CSV = "question,context,kind\n" + "How many legs?,A spider has eight legs.,num\n" * 200


def bad_file(how: str) -> tuple[str, bytes]:
    """(file name, content) of a data file that cannot be read as its name says."""
    packed = gzip.compress(GOOD_CSV.encode())
    return {
        "latin-1": ("qa.csv", "question,context,kind\nWhat café?,Le café,other\n".encode("latin-1")),
        "cp1252 in gzip": ("qa.csv.gz", gzip.compress("question,context,kind\nWhy?,Für dich,other\n".encode("cp1252"))),
        "not gzip": ("qa.csv.gz", GOOD_CSV.encode()),
        "cut short": ("qa.csv.gz", packed[:-12]),
        "bad crc": ("qa.csv.gz", packed[:-8] + bytes(4) + packed[-4:]),
        "damaged data": ("qa.csv.gz", packed[:30] + bytes(byte ^ 0xFF for byte in packed[30:60]) + packed[60:]),
    }[how]


@pytest.mark.parametrize(
    "how, reason",
    [
        ("latin-1", "not UTF-8 text"),
        ("cp1252 in gzip", "not UTF-8 text"),
        ("not gzip", "not a readable gzip file"),
        ("cut short", "not a readable gzip file"),
        ("bad crc", "not a readable gzip file"),
        ("damaged data", "not a readable gzip file"),
    ],
)
def test_a_file_not_utf8_or_a_damaged_gzip_is_one_error_line_naming_it(tmp_path, how, reason):
    name, data = bad_file(how)
    path = tmp_path / name
    path.write_bytes(data)
    for labelled in (True, False):
        with pytest.raises(SpecError) as error:
            task("qa", format="csv", **CUSTOM).load(path, labelled=labelled)
        message = str(error.value)
        assert message.startswith(f"{path}: {reason}") and "\n" not in message, message
