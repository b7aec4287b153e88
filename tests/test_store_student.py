"""Knowledge store search and persistence, the student's losses, and the retrieval student on a tiny BERT."""

import math

import faiss
import numpy as np
import pytest
import torch

from retrikt_ray.knowledge_store import KnowledgeStore
from retrikt_ray.retrieval_student import (
    RetrievalStudent,
    ce_loss,
    confidence_weights,
    encoder_fingerprint,
    kd_loss,
    rank_loss,
    store_rank_loss,
    teacher_neighbours,
)


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """One thread for torch and FAISS: these inputs are tiny, and the two OpenMP pools spin against
    each other (and against other processes) on a small machine, slowing the tests tenfold."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def unit_rows(array):
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def make_store(keys, num_labels=3, seed=0, teacher_dim=None):
    rng = np.random.default_rng(seed)
    rows = len(keys)
    soft = rng.dirichlet(np.ones(num_labels), size=rows).astype(np.float32)
    states = rng.normal(size=(rows, teacher_dim)).astype(np.float32) if teacher_dim else None
    inputs = [(f"text {i}", None if i % 2 else f"second {i}") for i in range(rows)]
    return KnowledgeStore(
        inputs=inputs,
        labels=rng.integers(0, num_labels, size=rows),
        soft_labels=soft,
        keys=keys,
        teacher_states=states,
        encoder_fingerprint="test",
    )


def clustered(rows, dim, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return unit_rows(centres[rng.integers(0, clusters, size=rows)] + 0.3 * rng.normal(size=(rows, dim)))


# ---------------------------------------------------------------------------------------- store
def test_flat_search_equals_brute_force():
    rng = np.random.default_rng(1)
    store = make_store(unit_rows(rng.normal(size=(300, 16))))
    queries = unit_rows(rng.normal(size=(20, 16)))
    scores, ids = store.search(queries, 10)
    exact = queries @ store.keys.T
    expected = np.argsort(-exact, axis=1)[:, :10]
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (20, 10)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, axis=1), atol=1e-5)


def test_search_excludes_own_row():
    rng = np.random.default_rng(2)
    store = make_store(unit_rows(rng.normal(size=(50, 8))))
    rows = np.array([0, 7, 49])
    scores, ids = store.search(store.keys[rows], 5, exclude=rows)
    assert ids.shape == (3, 5)
    assert not (ids == rows[:, None]).any()
    plain_scores, plain_ids = store.search(store.keys[rows], 6)
    np.testing.assert_array_equal(plain_ids[:, 0], rows)  # a row is its own best match
    np.testing.assert_array_equal(ids, plain_ids[:, 1:])
    np.testing.assert_allclose(scores, plain_scores[:, 1:])
    # -1 excludes nothing: the k best are returned
    _, kept = store.search(store.keys[rows], 5, exclude=np.array([-1, -1, -1]))
    np.testing.assert_array_equal(kept, plain_ids[:, :5])


def test_search_pads_small_store():
    rng = np.random.default_rng(3)
    store = make_store(unit_rows(rng.normal(size=(4, 8))))
    scores, ids = store.search(store.keys[:2], 6)
    assert (ids[:, :4] >= 0).all() and (ids[:, 4:] == -1).all()
    assert np.isneginf(scores[:, 4:]).all() and np.isfinite(scores[:, :4]).all()
    scores, ids = store.search(store.keys[:2], 6, exclude=np.array([0, 1]))
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all()
    assert 0 not in ids[0] and 1 not in ids[1]


def test_hnsw_recall():
    keys = clustered(5000, 32, 50, seed=4)
    store = make_store(keys)
    store.build_index("hnsw")
    assert store.index_kind == "hnsw"
    queries = unit_rows(keys[:200] + 0.1 * np.random.default_rng(4).normal(size=(200, 32)))
    _, ids = store.search(queries, 10)
    expected = np.argsort(-(queries @ keys.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert recall >= 0.9, recall


def test_ivfpq_returns_valid_ids():
    keys = clustered(2000, 32, 20, seed=5)
    store = make_store(keys)
    store.build_index("ivfpq", ivf_lists=1024, pq_subquantizers=16)
    assert store.index_kind == "ivfpq" and store.index.nlist == 2000 // 39
    scores, ids = store.search(keys[:10], 8, exclude=np.arange(10))
    assert ((ids >= 0) & (ids < 2000)).all()
    assert not (ids == np.arange(10)[:, None]).any()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_ivfpq_adapts_to_small_stores():
    keys = clustered(10, 24, 2, seed=5)  # 24 is not a multiple of 16 sub-quantizers; 10 rows < 256 codes
    store = make_store(keys)
    store.build_index("ivfpq", pq_subquantizers=16)
    assert store.index.pq.M == 12 and store.index.nlist == 1
    _, ids = store.search(keys[:2], 12)
    assert (np.sort(ids[:, :10], axis=1) == np.arange(10)).all() and (ids[:, 10:] == -1).all()


def test_auto_index_kind():
    keys = clustered(500, 16, 5, seed=6)
    store = make_store(keys)
    store.build_index("auto", exact_max_rows=1000)
    assert store.index_kind == "flat"
    store.build_index("auto", exact_max_rows=100)
    assert store.index_kind == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    keys = clustered(800, 16, 8, seed=7)
    store = make_store(keys, teacher_dim=12)
    store.build_index(kind)
    store.save(tmp_path / "store")
    loaded = KnowledgeStore.load(tmp_path / "store")
    assert loaded.version == store.version and loaded.index_kind == kind
    assert loaded.inputs == store.inputs
    np.testing.assert_array_equal(loaded.labels, store.labels)
    np.testing.assert_array_equal(loaded.soft_labels, store.soft_labels)
    np.testing.assert_array_equal(loaded.teacher_states, store.teacher_states)
    np.testing.assert_array_equal(loaded.example_ids, store.example_ids)
    queries = keys[:30]
    for exclude in (None, np.arange(30)):
        a_scores, a_ids = store.search(queries, 5, exclude)
        b_scores, b_ids = loaded.search(queries, 5, exclude)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_scores, b_scores)


def test_version_and_with_keys():
    keys = clustered(200, 16, 4, seed=8)
    store = make_store(keys)
    store.build_index("hnsw")
    assert store.version == make_store(keys.copy()).version
    new_keys = clustered(200, 16, 4, seed=9)
    moved = store.with_keys(new_keys, "other")
    assert moved.version != store.version
    assert moved.index_kind == "hnsw" and moved.encoder_fingerprint == "other"
    assert moved.inputs == store.inputs
    _, ids = moved.search(new_keys[:5], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    relabelled = make_store(keys)
    relabelled.labels[0] = (relabelled.labels[0] + 1) % 3
    assert relabelled.version != store.version


def test_subset():
    keys = clustered(100, 16, 4, seed=10)
    store = make_store(keys, teacher_dim=4)
    chosen = np.array([5, 17, 42, 99])
    small = store.subset(chosen)
    assert len(small) == 4 and small.inputs == [store.inputs[i] for i in chosen]
    np.testing.assert_array_equal(small.example_ids, chosen)
    np.testing.assert_array_equal(small.soft_labels, store.soft_labels[chosen])
    np.testing.assert_array_equal(small.teacher_states, store.teacher_states[chosen])
    _, ids = small.search(keys[chosen], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(4))  # ids are the subset's own row numbers


# --------------------------------------------------------------------------------------- losses
def test_kd_loss():
    q = torch.tensor([[0.5, 0.5]])
    p = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_loss(q, p).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(q, q).item() == pytest.approx(0.0, abs=1e-7)
    # 0 log 0 = 0, and a zero in p is floored instead of giving inf
    one_hot = torch.tensor([[1.0, 0.0]])
    assert kd_loss(one_hot, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert math.isfinite(kd_loss(torch.tensor([[0.0, 1.0]]), one_hot).item())


def test_weighted_kd_loss_is_the_weighted_mean_and_confidence_is_zero_at_uniform():
    q = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    p = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    rows = [kd_loss(q[i : i + 1], p[i : i + 1]).item() for i in range(3)]
    weights = confidence_weights(q)
    assert weights.tolist() == pytest.approx([0.8, 0.0, 0.6])
    assert kd_loss(q, p, weights).item() == pytest.approx((0.8 * rows[0] + 0.6 * rows[2]) / 1.4, rel=1e-6)
    assert kd_loss(q, p, torch.ones(3)).item() == pytest.approx(kd_loss(q, p).item(), rel=1e-6)
    assert kd_loss(q[1:2], p[1:2], confidence_weights(q[1:2])).item() == 0.0  # all at chance: nothing to learn
    assert confidence_weights(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])).tolist() == pytest.approx([1, 0.25])


def test_ce_loss():
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert ce_loss(torch.tensor([1, 0]), p).item() == pytest.approx(expected, rel=1e-6)


def test_rank_loss_zero_when_orders_match():
    z = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert rank_loss(z, z, 0.05, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    assert rank_loss(other, z, 0.05, 0.05).item() > 0
    assert rank_loss(z, z, 0.05, 0.1).item() > 0


def test_rank_loss_manual_three_items():
    h = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], requires_grad=True)
    tau_t, tau_s = 0.5, 0.2

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for i in range(3):
        others = [j for j in range(3) if j != i]
        t = torch.softmax(torch.tensor([cos(h[i], h[j]) / tau_t for j in others]), 0)
        s = torch.softmax(torch.tensor([cos(z[i].detach(), z[j].detach()) / tau_s for j in others]), 0)
        total += float((t * (t / s).log()).sum())
    loss = rank_loss(h, z, tau_t, tau_s)
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_the_student_loops_state_is_checkpointed_once_and_resumes_its_draws_and_keys(tmp_path):
    """The student loop's LoopState: what a checkpoint saves is its fields, through torch.save as Checkpoints
    does; resumed, the generator draws what the saved one would next, and the epoch's rows, totals, history, the
    rows seen and the re-encoded keys come back."""
    from dataclasses import fields

    from retrikt_ray.stages.student import StudentLoop

    saved = StudentLoop(generator=np.random.default_rng(7))
    saved.mine = [int(i) for i in saved.generator.permutation(6)][::2]
    saved.generator.choice(4, size=2, replace=False)  # a batch's gold rows
    saved.totals, saved.history = {"loss": 0.5, "kd": 0.25}, [{"epoch": 0, "loss": 0.75}]
    saved.seen = set(saved.mine)
    saved.keys = (np.eye(3, dtype=np.float32), "0123456789abcdef")
    state = saved.state_dict()
    assert set(state) == {field.name for field in fields(StudentLoop)}
    torch.save(state, tmp_path / "loop_state.pt")

    resumed = StudentLoop(generator=np.random.default_rng(7))
    resumed.load_state_dict(torch.load(tmp_path / "loop_state.pt", weights_only=False))
    assert resumed.generator.permutation(6).tolist() == saved.generator.permutation(6).tolist()
    assert resumed.generator.choice(4, size=2, replace=False).tolist() == saved.generator.choice(4, 2, False).tolist()
    assert (resumed.mine, resumed.totals, resumed.history, resumed.seen) == (
        saved.mine,
        saved.totals,
        saved.history,
        saved.seen,
    )
    assert np.array_equal(resumed.keys[0], saved.keys[0]) and resumed.keys[1] == saved.keys[1]


def test_store_rank_loss_over_the_batch_lists_equals_rank_loss():
    generator = torch.Generator().manual_seed(2)
    h, z = torch.randn(5, 6, generator=generator), torch.randn(5, 4, generator=generator)
    others = torch.tensor([[j for j in range(5) if j != i] for i in range(5)])
    keys = torch.nn.functional.normalize(z, dim=-1)[others]
    valid = torch.ones(5, 4, dtype=torch.bool)
    assert store_rank_loss(h, h[others], z, keys, valid, 0.1, 0.2).item() == pytest.approx(
        rank_loss(h, z, 0.1, 0.2).item(), rel=1e-5
    )


def test_store_rank_loss_ignores_invalid_members_and_reaches_the_query():
    generator = torch.Generator().manual_seed(3)
    h, members = torch.randn(2, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
    z = torch.randn(2, 5, generator=generator, requires_grad=True)
    keys = torch.nn.functional.normalize(torch.randn(2, 4, 5, generator=generator), dim=-1)
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    loss = store_rank_loss(h, members, z, keys, valid, 0.05, 0.05)
    changed_members, changed_keys = members.clone(), keys.clone()
    changed_members[~valid], changed_keys[~valid] = 100.0, -1.0
    assert store_rank_loss(h, changed_members, z, changed_keys, valid, 0.05, 0.05).item() == pytest.approx(
        loss.item(), rel=1e-6
    )
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # A student whose keys score like the teacher's states ranks every list as the teacher does.
    assert store_rank_loss(
        h, members, h, torch.nn.functional.normalize(members, dim=-1), valid, 0.05, 0.05
    ).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_neighbours_are_the_nearest_other_rows_by_cosine():
    states = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    nearest = teacher_neighbours(states, 5, chunk=16)
    normed = torch.nn.functional.normalize(states, dim=-1)
    cosines = (normed @ normed.T).fill_diagonal_(-2.0)
    assert nearest.shape == (50, 5)
    assert (nearest == cosines.topk(5, dim=-1).indices.numpy()).all()
    assert teacher_neighbours(states[:3], 5).shape == (3, 2)


# ---------------------------------------------------------------------------- retrieval student
TEXTS = [
    ("a wonderful, moving film", None),
    ("dull and far too long", None),
    ("the cast is superb", "the plot is thin"),
    ("I loved every minute", None),
    ("a waste of time", "nothing works"),
    ("charming and funny", None),
    ("painfully boring", None),
    ("the best film of the year", "a must see"),
    ("clumsy dialogue throughout", None),
    ("a delight from start to finish", None),
    ("forgettable", "and loud"),
    ("sharp, witty writing", None),
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrikt_ray.models import student_path

    return AutoTokenizer.from_pretrained(student_path("all-minilm-l6-v2"))


def tiny_student(tokenizer, seed=0, **kwargs):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RetrievalStudent(BertModel(config), tokenizer, num_labels=3, k=4, max_length=32, **kwargs)


def student_store(student, seed=0):
    rng = np.random.default_rng(seed)
    return KnowledgeStore(
        inputs=TEXTS,
        labels=rng.integers(0, 3, size=len(TEXTS)),
        soft_labels=rng.dirichlet(np.ones(3), size=len(TEXTS)).astype(np.float32),
        keys=student.embed_all(TEXTS, batch_size=5),
        teacher_states=None,
        encoder_fingerprint=encoder_fingerprint(student.encoder),
    )


def test_encode_unit_vectors_and_mixed_batches(tokenizer):
    student = tiny_student(tokenizer)
    with torch.no_grad():
        z = student.encode(TEXTS)
        one_by_one = torch.cat([student.encode([text]) for text in TEXTS])
    assert z.shape == (len(TEXTS), 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(z, one_by_one, atol=1e-5, rtol=1e-4)
    embedded = student.embed_all(TEXTS, batch_size=5)
    assert embedded.dtype == np.float32 and embedded.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(embedded, z.numpy(), atol=1e-5)


def test_embed_all_restores_mode(tokenizer):
    student = tiny_student(tokenizer)
    student.train()
    student.embed_all(TEXTS[:3])
    assert student.training and student.encoder.training


def test_prediction_mixture(tokenizer):
    student = tiny_student(tokenizer)
    store = student_store(student)
    with torch.no_grad():
        z = student.encode(TEXTS)
        out = student(z, store, exclude=np.arange(len(TEXTS)))
    torch.testing.assert_close(out["p"].sum(-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(out["p"], 0.5 * out["p_ret"] + 0.5 * out["p_head"])
    assert not (out["ids"] == torch.arange(len(TEXTS))[:, None]).any()
    student.lam = 1.0
    with torch.no_grad():
        out = student(z, store)
    torch.testing.assert_close(out["p"], out["p_ret"], atol=0, rtol=0)
    student.lam = 0.0
    with torch.no_grad():
        out = student(z, store)
    torch.testing.assert_close(out["p"], out["p_head"], atol=0, rtol=0)


def test_retrieval_probs_manual(tokenizer):
    student = tiny_student(tokenizer, tau=0.1)
    store = student_store(student)
    with torch.no_grad():
        z = student.encode(TEXTS[:3])
        p_ret, weights, ids = student.retrieval_probs(z, store)
    for row in range(3):
        neighbours = ids[row].numpy()
        cosines = store.keys[neighbours] @ z[row].numpy()
        expected_w = np.exp(cosines / 0.1) / np.exp(cosines / 0.1).sum()
        np.testing.assert_allclose(weights[row].numpy(), expected_w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p_ret[row].numpy(), expected_w @ store.soft_labels[neighbours], rtol=1e-4, atol=1e-6)
        exact = np.argsort(-(store.keys @ z[row].numpy()))[:4]
        np.testing.assert_array_equal(neighbours, exact)


def test_retrieval_probs_padding(tokenizer):
    student = tiny_student(tokenizer)
    store = student_store(student).subset([0, 1])
    with torch.no_grad():
        p_ret, weights, ids = student.retrieval_probs(student.encode(TEXTS[:2]), store)
    assert (ids[:, 2:] == -1).all() and (weights[:, 2:] == 0).all()
    torch.testing.assert_close(p_ret.sum(-1), torch.ones(2))


def test_gradient_flows_through_retrieval(tokenizer):
    student = tiny_student(tokenizer)
    store = student_store(student)
    z = student.encode(TEXTS[:4])
    p_ret, _, _ = student.retrieval_probs(z, store, exclude=np.arange(4))
    (-p_ret[:, 0].log().mean()).backward()
    grads = [p.grad for p in student.encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert student.head.weight.grad is None


def test_student_save_load_round_trip(tokenizer, tmp_path):
    student = tiny_student(tokenizer, tau=0.2, lam=0.3)
    store = student_store(student)
    before = student.predict(TEXTS, store, batch_size=5)
    student.save(tmp_path / "student")
    loaded = RetrievalStudent.load(tmp_path / "student")
    assert (loaded.k, loaded.tau, loaded.lam, loaded.max_length, loaded.num_labels) == (4, 0.2, 0.3, 32, 3)
    assert encoder_fingerprint(loaded.encoder) == encoder_fingerprint(student.encoder)
    after = loaded.predict(TEXTS, store, batch_size=5)
    for name in ("p", "p_ret", "p_head"):
        np.testing.assert_allclose(after[name], before[name], atol=1e-6)


def test_kd_training_reduces_loss_and_changes_fingerprint(tokenizer):
    student = tiny_student(tokenizer)
    store = student_store(student)
    fingerprint = encoder_fingerprint(student.encoder)
    q = torch.from_numpy(store.soft_labels)
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    exclude = np.arange(len(TEXTS))

    def loss():
        return kd_loss(q, student(student.encode(TEXTS), store, exclude=exclude)["p"])

    first = loss()
    for _ in range(10):
        optimiser.zero_grad()
        step_loss = loss()
        step_loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = loss()
    assert last.item() < first.item()
    assert encoder_fingerprint(student.encoder) != fingerprint


# ------------------------------------------------------------------------------ the fast path
def test_compute_dtype_auto_follows_the_hardware(monkeypatch):
    from retrikt_ray import engine
    from retrikt_ray.retrieval_student import compute_dtype

    assert compute_dtype("float32", "cpu") == torch.float32
    assert compute_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("float32", "cpu") == torch.float32


def test_the_bf16_copy_follows_every_optimiser_step(tokenizer):
    student = tiny_student(tokenizer, dtype=torch.bfloat16)
    before = student.embed(TEXTS)
    assert next(student.encoder.parameters()).dtype == torch.float32  # the trained weights stay float32
    assert all(p.dtype == torch.bfloat16 for p in student._inference_encoder().parameters())
    optimiser = torch.optim.SGD(student.encoder.parameters(), lr=1.0)
    student.encode(TEXTS).sum().backward()
    optimiser.step()
    after = student.embed(TEXTS)
    fresh = RetrievalStudent(student.encoder, tokenizer, num_labels=3, k=4, max_length=32, dtype=torch.bfloat16)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, fresh.embed(TEXTS), atol=0, rtol=0)
    assert "_inference_copy" not in dict(student.named_modules())  # never a submodule: not saved, not trained
    assert len(list(student.parameters())) == len(list(fresh.parameters()))


def test_training_encode_runs_under_autocast_with_float32_gradients(tokenizer):
    reference = tiny_student(tokenizer)
    fast = tiny_student(tokenizer, dtype=torch.bfloat16)
    z_fast, z_ref = fast.encode(TEXTS), reference.encode(TEXTS)
    assert z_fast.dtype == torch.float32
    torch.testing.assert_close(z_fast, z_ref, atol=0.03, rtol=0)
    assert not torch.equal(z_fast, z_ref)  # bf16 matmuls did run
    z_fast.sum().backward()
    grads = [p.grad for p in fast.encoder.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_fast_path_predicts_as_float32_on_the_packaged_student():
    """The packaged student on 300 SST-2 dev sentences, its store 256 train sentences: bf16 weights and
    length-sorted batches against the float32 path, row by row (the tolerance docs/serving.md states)."""
    import pandas as pd

    from retrikt_ray.config import StudentSpec, TaskSpec
    from retrikt_ray.tasks import Task

    train_file, dev_file = Task.from_spec(TaskSpec(name="sst2")).default_files()
    dev = pd.read_csv(dev_file, sep="\t").head(300)
    train = pd.read_csv(train_file, sep="\t").sample(256, random_state=0)
    torch.manual_seed(0)
    reference = RetrievalStudent.from_spec(StudentSpec(dtype="float32"), 2)
    fast = RetrievalStudent.from_spec(StudentSpec(dtype="bfloat16"), 2)
    fast.load_state_dict(reference.state_dict())
    inputs = [(text, None) for text in train["sentence"]]
    store = KnowledgeStore(
        inputs=inputs,
        labels=train["label"].to_numpy(),
        soft_labels=np.eye(2, dtype=np.float32)[train["label"].to_numpy()] * 0.8 + 0.1,
        keys=reference.embed_all(inputs),
        teacher_states=None,
        encoder_fingerprint=encoder_fingerprint(reference.encoder),
    )
    queries = [(text, None) for text in dev["sentence"]]
    expected, got = reference.predict(queries, store), fast.predict(queries, store)
    for name in ("p", "p_ret", "p_head"):
        assert np.abs(got[name] - expected[name]).max() <= FAST_PATH_TOLERANCE, name
    assert (got["p"].argmax(1) == expected["p"].argmax(1)).mean() >= 0.98
    # sorted batches of the float32 path equal one-by-one encoding
    unsorted = torch.cat([reference.encode(queries[i : i + 64]).detach() for i in range(0, 128, 64)])
    torch.testing.assert_close(reference.embed(queries[:128]), unsorted, atol=1e-5, rtol=0)


# Largest difference of a probability between the bf16 fast path and the float32 path (docs/serving.md).
FAST_PATH_TOLERANCE = 0.05


def test_the_packed_forward_equals_hf_on_pairs_and_singles(tokenizer):
    """packed_encoder: HF's padded forward, mean-pooled, equals the packed one (pairs carry token types)."""
    from retrikt_ray.packed_encoder import PackedBert, supports

    student = tiny_student(tokenizer)
    assert supports(student.encoder)
    student.eval()
    features = student.token_ids(TEXTS)
    batch = tokenizer.pad(features, return_tensors="pt")
    with torch.no_grad():
        expected = student._pooled(student.encoder, batch)
    got = PackedBert(student.encoder).embed(features, torch.device("cpu"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(student.embed(TEXTS, batch_size=5), student.encode(TEXTS).detach(), atol=1e-5, rtol=0)


def test_encoders_the_packed_forward_does_not_reproduce_use_hf(tokenizer):
    from transformers import BertConfig, BertModel

    from retrikt_ray.packed_encoder import supports

    relative = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            position_embedding_type="relative_key",
        )
    )
    assert not supports(relative)
    student = RetrievalStudent(relative, tokenizer, num_labels=3, k=4, max_length=32)
    assert student._inference_state()["packed"] is None
    student.eval()
    torch.testing.assert_close(student.embed(TEXTS, batch_size=5), student.encode(TEXTS).detach(), atol=1e-5, rtol=0)
