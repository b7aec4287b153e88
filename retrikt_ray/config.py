"""The job spec: one YAML file, validated by pydantic, one section per stage.

Every default of docs/method.md is a field here. Errors name the field path (`student.lr: ...`), so the CLI
can print one line and exit 2.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator


class SpecError(ValueError):
    """A user mistake in a job spec, a data file or an override; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- task
class TaskSpec(Section):
    """What the task is. Built-in names fill in every field; a custom task declares them here."""

    name: str = Field("sst2", description="sst2, rte, cb, copa, or a name of your own for a custom task")
    kind: Literal["classification", "choice"] | None = Field(
        None, description="classification (one label per example) or choice (pick one of several alternatives)"
    )
    description: str | None = Field(None, description="One line saying what the texts are; starts the prompts")
    format: Literal["jsonl", "tsv", "csv"] | None = Field(None, description="Data file format")
    columns: list[str] | None = Field(
        None,
        description="tsv/csv files without a header line: the name of each column, in order (the first line is then "
        "data, unless it repeats these names); None: the first line is the header",
    )
    text_fields: list[str] | None = Field(None, description="Input fields, in the order they are shown")
    choice_fields: list[str] | None = Field(None, description="choice tasks: the alternatives' fields")
    label_field: str | None = Field(None, description="Field holding the gold label")
    label_values: list[str] | None = Field(
        None, description="Raw label values as they appear in the file (strings), one per label, in label order"
    )
    label_names: list[str] | None = Field(None, description="Human-readable label names, one per label")
    verbalisers: list[str] | None = Field(None, description="One word per label that the teacher predicts")
    generation_template: str | None = Field(
        None,
        description="How an example is written for generation, with {field} slots, "
        "e.g. 'Premise: {premise} Hypothesis: {hypothesis}';"
        " the text before the first slot ends the generation prompt, the teacher writes the rest",
    )
    classification_template: str | None = Field(
        None, description="Teacher classification prompt with {field} slots; the verbaliser follows it"
    )
    answer_prefix: str | None = Field(
        None, description="Words that start the teacher's answer, right before the verbaliser (default 'Answer:')"
    )
    student_template: str | None = Field(None, description="How the student sees an example, with {field} slots")
    question_field: str | None = Field(None, description="choice tasks: field that selects a connective (COPA)")
    connectives: dict[str, str] | None = Field(
        None, description="choice tasks: question value -> words joining premise and alternative"
    )


class DataSpec(Section):
    """Where the examples come from and how the few labelled ones are drawn."""

    train_file: str | None = Field(None, description="Labelled pool the few shots are drawn from (default: packaged)")
    dev_file: str | None = Field(None, description="Evaluation split (default: packaged)")
    shots: int = Field(16, ge=1, description="k labelled examples per class (choice tasks: in total)")
    seed: int = Field(0, description="Seed of the few-shot draw")
    dev_limit: int | None = Field(None, ge=1, description="Evaluate on the first N dev rows only (None: all)")


class TeacherSpec(Section):
    """The teacher LM and its verbaliser classifier p_C."""

    model: str = Field("smollm2-135m-instruct", description="Packaged name, local folder or hub id of a causal LM")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Teacher precision. auto: per use (decoding, reading, scoring), what measured fastest on the "
        "hardware it runs on (engine.AUTO_PRECISION; float32 on CPUs without bf16 units); "
        "a dtype: that dtype everywhere",
    )
    trust_remote_code: bool = Field(False, description="Allow the model repository's own code to run")
    chat_template: bool = Field(
        True, description="Ask classification questions through the teacher's chat template, when it has one"
    )
    calibration: Literal["pool", "content_free"] = Field(
        "pool", description="Reference set for calibrating the verbaliser classifier"
    )
    soft_label_temperature: float = Field(
        1.0,
        gt=0,
        description="Temperature on the calibrated p_C that gives the soft labels q_T "
        "(1: q_T = p_C as in docs/method.md; below 1 sharpens the flat two-word distributions of small teachers)",
    )
    state: Literal["answer", "mean_pool"] = Field(
        "answer",
        description="h_T for L_rank: 'answer' is the state where the teacher reads off its answer (the classification "
        "prompt's last token), 'mean_pool' the text's mean-pooled states (the original recipe's, docs/method.md). "
        "As similarities for kNN on SST-2 (benchmarks/results/teacher_states.md) the answer state scores far above "
        "chance and the mean-pooled one near it",
    )
    hidden_layer: int = Field(-1, description="Teacher layer that h_T is taken from")
    classify_batch_size: int = Field(32, ge=1, description="Texts per teacher forward when classifying")


# The teacher fields that define its classifier p_C (what PPO's reward and evaluation depend on).
TEACHER_CLASSIFIER = (
    "teacher.model",
    "teacher.dtype",
    "teacher.trust_remote_code",
    "teacher.chat_template",
    "teacher.calibration",
)


# --------------------------------------------------------------------------------------- stages
class DeepSpeedSpec(Section):
    """How a training stage's optimisation runs: a DeepSpeed engine in every Ray Train worker."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters",
    )
    offload_optimizer: bool = Field(False, description="ZeRO 1-3 on GPUs: keep optimizer state in CPU memory")
    offload_parameters: bool = Field(False, description="ZeRO 3 on GPUs: keep parameters in CPU memory")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision of the engine")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches whose gradients make one optimizer step"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per worker per forward pass (None: the stage's batch size)"
    )
    config_file: str | None = Field(
        None,
        description="A DeepSpeed JSON config used as is (batch sizes it leaves out come from the stage); "
        "the other fields must then stay at their defaults",
    )

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo):
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError("offload_parameters needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        changed = [
            name
            for name, field in type(self).model_fields.items()
            if name != "config_file" and getattr(self, name) != field.default
        ]
        if self.config_file is not None and changed:
            raise ValueError(f"config_file is used as is: leave out {', '.join(changed)}")
        # Workers get the engine config built on the driver (training.deepspeed_config); their node may lack the path.
        context = info.context or {}
        if self.config_file is not None and not context.get("in_worker"):
            path = Path(context.get("base", ".")) / Path(self.config_file).expanduser()
            if not path.is_file():
                raise ValueError(f"config_file: file not found: {self.config_file}")
            try:
                loaded = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as error:
                raise ValueError(f"config_file: {self.config_file} is not valid JSON (line {error.lineno})") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"config_file: {self.config_file} is not a JSON object")
        return self


class DeepSpeedOption(Section):
    deepspeed: DeepSpeedSpec | None = Field(
        None, description="This stage's DeepSpeed settings; None: the job's shared `deepspeed` section"
    )


class PromptSpec(DeepSpeedOption):
    """Stage 1: soft-prompt tuning of the frozen teacher (PEFT) on the few labelled examples."""

    num_virtual_tokens: int = Field(20, ge=1, description="m, the soft prompt's length")
    init_from_description: bool = Field(True, description="Initialise P from the embedding of the task description")
    epochs: int = Field(10, ge=0, description="Passes over the few-shot set")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0, description="Learning rate of the soft prompt")
    max_length: int = Field(96, ge=8, description="Tokens per training text (prompt + example)")


class PPOSpec(DeepSpeedOption):
    """Stage 2: PPO on the soft prompt. Reward = alpha*log p_C(y|x) + beta*diversity - gamma*malformed."""

    enabled: bool = Field(True, description="False: stage 3 uses the stage-1 prompt as is")
    updates: int = Field(8, ge=0, description="PPO updates (each: one batch of rollouts, then ppo_epochs passes)")
    rollouts_per_update: int = Field(16, ge=1, description="Samples drawn per update (split over labels)")
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0, description="Learning rate of the soft prompt and value head")
    per_label_prompt: bool = Field(
        False,
        description="Tune a copy of the stage-1 prompt per label, "
        "so that one label's rewards do not pull the prompt another label samples from",
    )
    alpha: float = Field(1.0, description="Weight of label consistency log p_C(y|x)")
    beta: float = Field(0.5, description="Weight of diversity 1 - max cos to the label's memory bank")
    gamma: float = Field(1.0, description="Penalty for a sample that does not parse or is out of length bounds")
    malformed_consistency: Literal["valid_mean", "floor"] = Field(
        "valid_mean",
        description="Consistency term of a malformed sample, which has no p_C: "
        "its batch's valid mean (gamma alone punishes "
        "bad form) or log 0.01 (form then outweighs the label, and PPO learns form)",
    )
    kl_coef: float = Field(0.05, ge=0, description="eta, per-token KL to the stage-1 prompt")
    gae_lambda: float = Field(0.95, ge=0, le=1)
    discount: float = Field(1.0, ge=0, le=1, description="GAE gamma")
    clip_eps: float = Field(0.2, gt=0, description="Clipping of the policy ratio")
    value_clip: float = Field(0.2, gt=0, description="Clipping of the value update")
    value_coef: float = Field(0.5, ge=0)
    memory_bank_size: int = Field(128, ge=1, description="Recent accepted samples kept per label for diversity")
    max_new_tokens: int = Field(48, ge=4)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(
        50,
        ge=0,
        description="Keep the k most likely tokens before top-p (0: none); 50 is Hugging Face generate's default",
    )
    temperature: float = Field(1.0, gt=0)
    eval_samples_per_label: int = Field(
        48,
        ge=1,
        description="Samples per label drawn on fixed seeds from the stage-1 and the final prompt, "
        "to measure what PPO changed",
    )
    keep_stage1_when_worse: bool = Field(
        True,
        description="Pass on the stage-1 prompt instead of the final one "
        "when the final prompt's mean reward on the fixed draws is "
        "lower than the stage-1 prompt's (PPO made things worse, e.g. its steps broke the form of a long template)",
    )
    student_reward: Literal["off", "learnability", "usefulness", "targeted"] = Field(
        "off",
        description="A reward term from a small student that PPO keeps up to date: the student encoder, frozen, "
        "with a linear head refitted after every update on the memory bank's samples and their teacher soft labels "
        "(docs/method.md). learnability: the head already predicts the sample's soft label, times the sample's "
        "novelty against the bank; usefulness: the sample, added to a kNN store of the bank, raises the probability "
        "retrieval gives the labelled examples' gold labels; targeted: the sample's soft label points the way the "
        "head's errors on nearby labelled examples point. off: the reward without it",
    )
    student_reward_weight: float = Field(1.0, ge=0, description="Weight of the student term in the reward")
    student_reward_tau: float = Field(
        0.05, gt=0, description="Temperature of the similarity weights to the labelled examples (usefulness, targeted)"
    )
    student_head_steps: int = Field(
        20, ge=1, description="L-BFGS iterations that refit the student head on the bank after every update"
    )
    student_label_temperature: float = Field(
        1.0,
        gt=0,
        description="Temperature of the teacher soft labels the student head learns from and is scored against, as "
        "teacher.soft_label_temperature is for the store's (below 1 sharpens them)",
    )


class GenerateSpec(Section):
    """Stage 3: sharded generation, dedup and teacher annotation with Ray Data."""

    samples_per_label: int = Field(500, ge=1, description="N_y, samples drawn per label before filtering")
    batch_size: int = Field(
        128,
        ge=1,
        description="Rows a replica decodes at once (its slots); "
        "each sample has its own seed, so this changes speed, not samples",
    )
    rows_per_task: int = Field(
        256,
        ge=1,
        description="Samples per Ray Data row (one row = one label and seed; the unit a stopped run resumes from)",
    )
    max_new_tokens: int = Field(48, ge=4)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(
        50,
        ge=0,
        description="Keep the k most likely tokens before top-p (0: none); 50 is Hugging Face generate's default",
    )
    temperature: float = Field(1.0, gt=0)
    seed: int = Field(0)
    min_words: int = Field(3, ge=1, description="Shorter samples are malformed (dropped, counted)")
    max_words: int = Field(60, ge=1, description="Longer samples are malformed (dropped, counted)")
    near_duplicate_cosine: float = Field(0.95, gt=0, le=1, description="Within a label, drop a sample this close")
    on_disagreement: Literal["keep", "drop"] = Field(
        "keep", description="A sample whose teacher label differs from its generated label: keep (soft label) or drop"
    )

    @model_validator(mode="after")
    def _word_bounds(self):
        if self.min_words > self.max_words:
            raise ValueError("min_words is larger than max_words")
        return self


class UnlabelledSpec(Section):
    """Stage 3b, beyond the paper's recipe (off by default): in-domain texts without labels, labelled by the
    teacher's calibrated zero-shot classifier, join the generated samples in the store."""

    samples: int = Field(
        0, ge=0, description="Unlabelled texts the teacher labels into the store (0: none, the paper's recipe)"
    )
    file: str | None = Field(
        None,
        description="File of in-domain inputs in the task's format, labels not needed (ignored if present); "
        "default: the training file, without the labelled examples",
    )
    min_words: int = Field(3, ge=1, description="Shorter texts are skipped (counted)")
    seed: int = Field(0, description="Seed of the random draw of `samples` texts from the file")


class StoreSpec(Section):
    """Stage 4: the knowledge store (FAISS over student-embedding keys)."""

    index: Literal["auto", "flat", "hnsw", "ivfpq"] = Field("auto", description="auto: exact up to exact_max_rows")
    exact_max_rows: int = Field(200_000, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ivf_lists: int = Field(1024, ge=1)
    pq_subquantizers: int = Field(16, ge=1)
    encode_batch_size: int = Field(64, ge=1)
    fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the kept samples that enter the store, drawn at random (store-size ablations)",
    )


class StudentSpec(DeepSpeedOption):
    """The student encoder, and stage 5: training it to retrieve (L_kd + a*L_ce + b*L_rank)."""

    model: str = Field("all-minilm-l6-v2", description="Packaged name, local folder or hub id of an encoder")
    trust_remote_code: bool = Field(False)
    max_length: int = Field(64, ge=8, description="Tokens per student input")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The student's compute dtype: training runs its matmuls under autocast in it, and encoding "
        "(store keys, evaluation, serving) uses a copy of the weights in it; the weights stay float32. auto: "
        "bfloat16 on CPUs with bf16 units and on GPUs that have bf16, float32 elsewhere",
    )
    k: int = Field(16, ge=1, description="Neighbours retrieved from the store")
    tau: float = Field(0.05, gt=0, description="Temperature of the neighbour weights")
    lam: float = Field(0.5, ge=0, le=1, description="p = lam * p_ret + (1 - lam) * p_head")
    retrieval_gate: bool = Field(
        True,
        description="Before training, the untrained student retrieves the store's soft labels "
        "for the labelled examples; "
        "when they answer them no better than always answering their majority label (by one standard error), the "
        "student trains and predicts with its head alone (lam = 0), as retrieving would only add the teacher's noise",
    )
    kd_weighting: Literal["uniform", "confidence"] = Field(
        "uniform",
        description="How L_kd weighs the store rows of a batch. uniform: equally (the recipe). confidence: by "
        "how far the row's soft label is from uniform, (max q - 1/C) / (1 - 1/C), so that samples the teacher "
        "labels near chance teach the student little",
    )
    kd_bootstrap: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the student's own current prediction (no gradient) mixed into each L_kd target: "
        "(1 - beta) q + beta p, soft bootstrapping, so that a label the student and the rest of the store "
        "contradict pulls less; 0: the teacher's soft labels alone",
    )
    a: float = Field(1.0, ge=0, description="Weight of L_ce on the gold few-shot set")
    b: float = Field(1.0, ge=0, description="Weight of L_rank (listwise ranking distillation)")
    tau_teacher: float = Field(0.05, gt=0, description="tau_T of L_rank")
    tau_student: float = Field(0.05, gt=0, description="tau_S of L_rank")
    rank_lists: Literal["batch", "store"] = Field(
        "batch",
        description="What L_rank ranks for each store row. batch: the other rows of its batch (RankCSE, the recipe). "
        "store: the rank_list_size store rows the teacher finds nearest plus the k the student currently retrieves, "
        "scored against their store keys, so the student learns to retrieve what the teacher finds similar",
    )
    rank_list_size: int = Field(
        16, ge=1, description="Teacher-nearest store rows in each list when rank_lists is store"
    )
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(32, ge=2)
    length_grouped_batches: bool = Field(
        True,
        description="Batch store rows of similar token length together, so that batches carry less padding: each "
        "epoch's shuffled order is cut into groups of 8 batches, each group sorted by length and cut into batches, "
        "and the batches are then taken in a shuffled order; false: batches in the shuffled order",
    )
    gold_per_batch: int = Field(8, ge=0, description="Gold few-shot examples oversampled into each batch")
    lr: float = Field(3e-5, gt=0)
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of the linear head")
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0)


class EvaluateSpec(Section):
    """Stage 6: dev accuracy of student+store, the student head alone, and the teacher."""

    teacher_zero_shot: bool = Field(True, description="Also score the teacher's calibrated zero-shot classifier")
    latency_examples: int = Field(64, ge=1, description="Examples timed one at a time for CPU latency")
    batch_size: int = Field(64, ge=1)


class ResourcesSpec(Section):
    """Where the work runs. It changes speed, not results, except `num_workers`: a training stage's world size
    sets its global batch and each worker's share of the data (and in PPO of the rollouts and their seeds), so
    it is in the training stages' hashes. Every other field is in NOT_RESULTS, with the reason."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers per training stage")
    generation_replicas: int = Field(2, ge=1, description="Most teacher replicas generating at once")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker")
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs per generation replica (fractional on CPU nodes)")
    use_gpu: bool = Field(
        False, description="GPUs for training workers (one each) and teacher replicas (gpus_per_replica each)"
    )
    gpus_per_replica: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With use_gpu: the share of one GPU a teacher replica takes; below 1, several replicas "
        "of a small teacher generate side by side on one GPU (0.5: two per GPU)",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="pack: training workers in a PACK placement group (one node while it fits) and an autoscaling "
        "pool of up to generation_replicas teacher replicas; spread: training workers in a SPREAD placement group "
        "and a fixed pool of generation_replicas replicas scheduled SPREAD, "
        "so the work lands on as many nodes as it can",
    )
    max_failures: int = Field(
        1,
        ge=-1,
        description="Restarts of a training stage's worker group after a worker dies (-1: no limit); "
        "each restart resumes from the stage's last checkpoint",
    )
    checkpoint_every_steps: int | None = Field(
        200, ge=1, description="Prompt and student stages: checkpoint every N optimizer steps (None: never)"
    )
    checkpoint_every_updates: int | None = Field(2, ge=1, description="PPO: checkpoint every N updates (None: never)")
    report_poll_s: float = Field(
        0.25,
        gt=0,
        description="Seconds between a training stage's polls of its workers (Ray Train's health check). A "
        "worker's metrics or checkpoint report waits for the next poll, so Ray's default of 2 s stalls training "
        "at every report; raise it for stages of very many workers. RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, when set, wins",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per process (None: torch's default)")
    address: str | None = Field(
        None,
        description="Ray address; None starts a local Ray in-process (its training stages run without Ray Train's "
        "preemption watcher: one machine has no node to drain)",
    )
    auth_token_file: str | None = Field(
        None,
        description="File holding the Ray cluster's token for `retrikt submit` "
        "(None: Ray's own, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
    )


class StorageSpec(Section):
    """Where runs are kept. Not part of any content hash."""

    runs_dir: str = Field(
        "runs",
        description="Where run directories are written: a local or shared path, or a pyarrow filesystem URI "
        "(s3://bucket/runs, gs://bucket/runs, hdfs://..., file:///shared/runs) that every finished stage is uploaded "
        "to and finished stages are fetched from",
    )
    cache_dir: str = Field(
        "~/.cache/retrikt",
        description="Converted models, other reusable downloads, and the local staging copies of runs kept at a URI",
    )


class CaptureSpec(Section):
    """What `retrikt serve` keeps of `/v1/classify` traffic for `retrikt grow --from-traffic` (off by default).
    Only the inputs' fields and the prediction's label and confidence are kept, never headers or tokens, in
    Parquet files under `<run>/traffic/`, one per predicted batch."""

    enabled: bool = Field(False, description="Keep the inputs of /v1/classify requests")
    max_rows: int = Field(100_000, ge=1, description="Most inputs kept; the oldest are dropped (and counted) beyond")
    max_confidence: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Keep only inputs whose predicted label's probability is at most this (1: every input)",
    )


class ServeSpec(Section):
    """`retrikt serve`: the HTTP endpoint of student + store on Ray Serve. Not part of any content hash."""

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on; a non-loopback host needs a token")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    max_inputs_per_request: int = Field(64, ge=1, description="A request with more inputs gets 413")
    max_chars_per_input: int = Field(
        2000, ge=1, description="An input with more characters (all its fields together) gets 413"
    )
    batch_max_size: int = Field(16, ge=1, description="Most requests one replica predicts together (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Longest wait for a batch to fill, seconds")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests a replica takes at once (running or waiting for a batch); >= batch_max_size"
    )
    min_replicas: int = Field(
        2,
        ge=0,
        description="Fewest student+store replicas (autoscaling); 2 replicas of 1 CPU served more than 1 of 1 or 2 "
        "CPUs on a 2-core machine (benchmarks/results/serve.md)",
    )
    max_replicas: int = Field(2, ge=1, description="Most student+store replicas (autoscaling)")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling adds or removes replicas to keep this many requests ongoing per replica"
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per student+store replica")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs of the HTTP ingress replica (it parses and forwards)")
    token_file: str | None = Field(None, description="File holding the bearer token; wins over token_env")
    token_env: str | None = Field(
        "RETRIKT_SERVE_TOKEN", description="Environment variable holding the bearer token (when token_file is unset)"
    )
    capture: CaptureSpec = Field(
        default_factory=CaptureSpec, description="Traffic capture for `retrikt grow --from-traffic` (below)"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        if self.max_ongoing_requests < self.batch_max_size:
            raise ValueError("max_ongoing_requests is smaller than batch_max_size (batches could never fill)")
        return self


class TrackingSpec(Section):
    """MLflow experiment tracking of every run and sweep (retrikt_ray/tracking.py). Not part of any content hash."""

    enabled: bool = Field(True, description="Track runs and sweeps in MLflow; false: nothing is written")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: a server (http://host:5000) or a database (sqlite:////abs/path/mlflow.db). "
        "None: sqlite:///<runs_dir>/mlflow/mlflow.db beside the run directories (for a runs_dir URI, beside their "
        "local staging copies). On a cluster, a server (or a database on a shared volume) the driver and Tune "
        "trials reach",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; None: the job's name")


class JobSpec(Section):
    """A whole RetriKT job."""

    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run directory")
    task: TaskSpec = TaskSpec()
    data: DataSpec = DataSpec()
    teacher: TeacherSpec = TeacherSpec()
    student: StudentSpec = StudentSpec()
    prompt: PromptSpec = PromptSpec()
    ppo: PPOSpec = PPOSpec()
    generate: GenerateSpec = GenerateSpec()
    unlabelled: UnlabelledSpec = UnlabelledSpec()
    store: StoreSpec = StoreSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()
    serve: ServeSpec = ServeSpec()
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="after")
    def _deepspeed_fits_resources(self):
        for stage in self.training_sections():
            settings = self.deepspeed_for(stage)
            where = f"{stage}.deepspeed" if getattr(self, stage).deepspeed is not None else "deepspeed"
            if settings.precision == "fp16" and not self.resources.use_gpu:
                raise ValueError(f"{where}.precision: fp16 needs GPUs (resources.use_gpu: true); use fp32 or bf16")
            if (settings.offload_optimizer or settings.offload_parameters) and not self.resources.use_gpu:
                raise ValueError(f"{where}: offloading moves GPU memory to the CPU and needs resources.use_gpu: true")
        micro = self.deepspeed_for("student").micro_batch_size
        if micro is not None and micro < 2 and self.student.b > 0:
            raise ValueError(
                "student.deepspeed.micro_batch_size: L_rank (student.b > 0) needs at least 2 rows per batch"
            )
        return self

    @classmethod
    def training_sections(cls) -> tuple[str, ...]:
        """The sections with a `deepspeed` option: those of the training stages (stage_contract.Stage.trains)."""
        return tuple(
            name
            for name, field in cls.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, DeepSpeedOption)
        )

    def deepspeed_for(self, stage: str) -> DeepSpeedSpec:
        """A training stage's DeepSpeed settings: its own section, else the shared one."""
        return getattr(self, stage).deepspeed or self.deepspeed

    def lookup(self, path: str) -> Any:
        value: Any = self.model_dump(mode="json")
        for part in path.split("."):
            value = value[part]
        return value

    def spec_hash(self) -> str:
        """Hash of everything that changes results: the whole spec less NOT_RESULTS (names the run folder)."""
        return content_hash(results_only("", self.model_dump(mode="json")))


# The fields that change no stage's results, each with the reason. A stage's hash covers every field of the
# sections it reads (stage_contract.Stage.reads) less these, so a field added to a section is hashed unless it
# is listed here. A batch size that shapes training (prompt, ppo and student batch sizes, DeepSpeed's micro-batch
# and accumulation) changes results and is not listed; nor is resources.num_workers (ResourcesSpec).
NOT_RESULTS: dict[str, str] = {
    "name": "names the run folder, not what runs in it",
    "storage": "where runs, models and caches are kept",
    "serve": "how `retrikt serve` serves a finished run",
    "tracking": "where runs are recorded for MLflow, not what runs",
    "teacher.classify_batch_size": "texts per teacher forward when reading: each text is read alone (padding "
    "masked, tests/test_engine.py), so it changes speed, not p_C or h_T beyond float rounding",
    "generate.batch_size": "rows a replica decodes at once: every sample draws from its own seed (engine.row_seeds, "
    "tests/test_engine.py), so it changes speed, not samples",
    "resources.generation_replicas": "teacher replicas at once: generation rows (one label and seed each, "
    "generate.rows_per_task samples) and annotation chunks are fixed before they are shared out",
    "resources.cpus_per_worker": "CPUs, hence torch threads, of a training worker: speed",
    "resources.cpus_per_replica": "CPUs, hence torch threads, of a teacher replica: speed",
    "resources.torch_threads": "torch threads per process: speed",
    "resources.use_gpu": "the device: its kernels round floats differently, as two machines do; with a dtype of "
    "auto (teacher.dtype, student.dtype) the precision follows the hardware, which no field names: pin the dtype "
    "for results that do not depend on it",
    "resources.gpus_per_replica": "how many teacher replicas share a GPU: speed",
    "resources.placement": "which nodes the workers and replicas land on",
    "resources.max_failures": "a restarted worker group resumes from its last checkpoint, which holds the loop's "
    "whole state and random generators",
    "resources.checkpoint_every_steps": "how often the training state is saved, not what it is",
    "resources.checkpoint_every_updates": "how often PPO's state is saved, not what it is",
    "resources.report_poll_s": "how soon the controller takes a worker's report, not what the report holds",
    "resources.address": "which Ray cluster runs the job",
    "resources.auth_token_file": "how `retrikt submit` reaches the cluster",
}


# Fields added to a section that stages hash after runs were made without them, each at a default that gives
# those runs' results. At its default such a field is left out of every hash, so those runs keep their hashes
# and their finished stages are reused; set to anything else, it is hashed as usual. Never change such a
# field's default: runs made at the old default would then be taken for runs at the new one.
HASHED_WHEN_SET = (
    "ppo.student_reward",
    "ppo.student_reward_weight",
    "ppo.student_reward_tau",
    "ppo.student_head_steps",
    "ppo.student_label_temperature",
)


@functools.cache
def _default(path: str) -> Any:
    return JobSpec().lookup(path)


def at_unhashed_default(path: str, value: Any) -> bool:
    """Whether the field at `path` is one of HASHED_WHEN_SET left at its default (then no hash covers it)."""
    return path in HASHED_WHEN_SET and value == _default(path)


def not_results(path: str) -> str | None:
    """Why the field at `path` (or the section holding it) changes no result; None when it may."""
    for excluded, reason in NOT_RESULTS.items():
        if path == excluded or path.startswith(excluded + "."):
            return reason
    return None


def results_only(path: str, value: Any) -> Any:
    """The dumped value at `path` ("" for the whole spec) less the NOT_RESULTS fields under it and the
    HASHED_WHEN_SET fields at their defaults."""
    if not isinstance(value, dict):
        return value
    kept = {}
    for key, item in value.items():
        child = f"{path}.{key}" if path else key
        if not_results(child) is None and not at_unhashed_default(child, item):
            kept[key] = results_only(child, item)
    return kept


def content_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------- loading
def format_validation_error(error: ValidationError) -> str:
    """The first failure as one line, `section.field: message`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    # Checks across sections name their fields in the message.
    return f"{where}: {message}{extra}" if where else f"{message}{extra}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.field=value` -> (['section', 'field'], parsed YAML value)."""
    if "=" not in text:
        raise SpecError(f"--set {text}: expected section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {text}: empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _override_items(overrides: list[str] | dict[str, Any]):
    """(what an error names, field path, value) of each override, read as it is reached."""
    if isinstance(overrides, dict):
        for path, value in overrides.items():
            parts = path.split(".")
            if not all(parts):
                raise SpecError(f"{path}: empty field name")
            yield path, parts, value
    else:
        for text in overrides:
            yield (f"--set {text}", *parse_override(text))


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Set fields of a raw (not yet validated) spec: `--set` texts `section.field=value`, each value read as
    YAML, or a mapping of `section.field` paths to values (`tune.with_values`). `validate_spec` checks them."""
    for where, parts, value in _override_items(overrides):
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"{where}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec; relative data paths are resolved against its folder."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: job spec not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise SpecError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: a job spec is a mapping of sections")
        base = path.resolve().parent
    return validate_spec(apply_overrides(raw, overrides or []), base)


def validate_spec(raw: dict, base: Path) -> JobSpec:
    """A raw spec validated (its first mistake as a one-line SpecError), relative paths resolved against `base`."""
    try:
        spec = JobSpec.model_validate(raw, context={"base": base})
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None
    return resolve_paths(spec, base)


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    sections = [(spec.data, "train_file"), (spec.data, "dev_file"), (spec.unlabelled, "file")]
    sections += [
        (settings, "config_file")
        for settings in (spec.deepspeed, *(getattr(spec, stage).deepspeed for stage in spec.training_sections()))
        if settings is not None
    ]
    for section, field in sections:
        value = getattr(section, field)
        if value is not None and not Path(value).expanduser().is_absolute():
            setattr(section, field, str((base / value).resolve()))
    return spec


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
