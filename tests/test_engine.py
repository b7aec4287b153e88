"""The teacher engine against Hugging Face's own forward and `generate`: greedy continuations token for token,
log-probs and states within float tolerance, and the sampling semantics (seeds, top-p, stop tokens, rows of
different lengths, batching that changes nothing). On the tiny 2-layer teacher, and on the packaged one."""

import math

import numpy as np
import pytest
import torch

from retrikt_ray import engine as engine_module
from retrikt_ray.engine import SamplingParams, TorchEngine, next_tokens, resolve_precision, row_seeds, top_p_keep
from retrikt_ray.models import load_teacher

FLOAT32 = resolve_precision("float32", "cpu")


@pytest.fixture(scope="module")
def tiny_teacher(tiny_models):
    return load_teacher(tiny_models["teacher"], "~/.cache/retrikt")


@pytest.fixture(scope="module")
def packaged_teacher():
    return load_teacher("smollm2-135m-instruct", "~/.cache/retrikt")


def tiny_gpt2():
    """A 2-layer GPT-2: not a Llama-family layout, so the engine runs it through the Hugging Face forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=4)).eval()
    model.requires_grad_(False)
    return model


def prompt_of(model, token_ids: list[int], soft_prompt: torch.Tensor | None = None) -> torch.Tensor:
    embeds = model.get_input_embeddings()(torch.tensor(token_ids)).float()
    return embeds if soft_prompt is None else torch.cat([soft_prompt, embeds])


def hf_greedy(
    model, prompt: torch.Tensor, rows: int, max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int
) -> torch.Tensor:
    embeds = prompt[None].expand(rows, -1, -1)
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
    )


def assert_same_greedy(model, engine, prompt, stop_ids, pad_id, max_new_tokens=24):
    expected = hf_greedy(model, prompt, 2, max_new_tokens, stop_ids, pad_id)
    params = SamplingParams(max_new_tokens, stop_ids, greedy=True)
    generation = engine.generate(prompt, row_seeds(0, 2), params, pad_id, batch_size=2)
    width = int(generation.lengths.max())
    assert generation.token_ids.shape == (2, width)
    # HF pads after a row's stop token and stops when every row has stopped: the same tensor.
    torch.testing.assert_close(generation.token_ids, expected[:, :width], rtol=0, atol=0)
    assert width == expected.shape[1] or (expected[:, width:] == pad_id).all()


@pytest.mark.parametrize("soft", [None, "2d", "3d"])
def test_greedy_decoding_is_hf_generate_token_for_token_on_the_tiny_teacher(tiny_teacher, soft):
    model, tokenizer = tiny_teacher
    engine = TorchEngine(model, FLOAT32)
    assert engine.lean
    ids = tokenizer("Write a movie review. Review:").input_ids
    soft_prompt = None
    if soft is not None:
        prompts = 0.1 * torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
        soft_prompt = prompts[1] if soft == "3d" else prompts[0]  # a per-label prompt gives its label's row
    prompt = prompt_of(model, ids, soft_prompt)
    assert_same_greedy(model, engine, prompt, (tokenizer.eos_token_id,), tokenizer.pad_token_id)


@pytest.mark.parametrize("with_soft_prompt", [False, True])
def test_greedy_decoding_is_hf_generate_token_for_token_on_the_packaged_teacher(packaged_teacher, with_soft_prompt):
    model, tokenizer = packaged_teacher
    engine = TorchEngine(model, FLOAT32)
    ids = tokenizer("Write one short positive movie review.\nReview:").input_ids
    soft_prompt = (
        0.02 * torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        if with_soft_prompt
        else None
    )
    stop_ids = (tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False).input_ids[-1])
    assert_same_greedy(
        model, engine, prompt_of(model, ids, soft_prompt), stop_ids, tokenizer.pad_token_id, max_new_tokens=32
    )


def test_greedy_decoding_through_the_hugging_face_forward_for_other_architectures():
    model = tiny_gpt2()
    engine = TorchEngine(model, FLOAT32)
    assert not engine.lean
    assert_same_greedy(model, engine, prompt_of(model, [5, 17, 42, 7]), (3,), 0, max_new_tokens=16)


def reference_continuation_outputs(model, prompt: torch.Tensor, token_ids: torch.Tensor):
    """The teacher's previous `continuation_outputs`: one Hugging Face forward over prompt + continuation."""
    rows, length = token_ids.shape
    embeds = torch.cat([prompt[None].expand(rows, -1, -1), model.get_input_embeddings()(token_ids)], dim=1)
    output = model(inputs_embeds=embeds, output_hidden_states=True)
    start = prompt.shape[0] - 1
    logprobs = torch.log_softmax(output.logits[:, start : start + length].float(), dim=-1)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), output.hidden_states[-1][:, start : start + length]


@pytest.mark.parametrize("which", ["tiny", "gpt2"])
def test_scores_of_given_continuations_equal_the_previous_forward_and_carry_the_soft_prompts_gradient(
    tiny_teacher, which
):
    model = tiny_teacher[0] if which == "tiny" else tiny_gpt2()
    engine = TorchEngine(model, FLOAT32)
    hidden = model.config.hidden_size
    soft_prompt = (0.1 * torch.randn(4, hidden, generator=torch.Generator().manual_seed(2))).requires_grad_()
    token_ids = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(3))
    prompt = torch.cat([soft_prompt, prompt_of(model, [11, 12, 13])])
    logprobs, states = engine.score(prompt, token_ids)
    expected_logprobs, expected_states = reference_continuation_outputs(model, prompt, token_ids)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states.float(), expected_states.float(), atol=1e-4, rtol=1e-4)
    (gradient,) = torch.autograd.grad(logprobs.sum(), soft_prompt)
    (expected_gradient,) = torch.autograd.grad(expected_logprobs.sum(), soft_prompt)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("which", ["tiny", "gpt2"])
def test_reading_shares_the_prefix_and_sorts_by_length_without_changing_a_number(tiny_teacher, which):
    """Logits at the last token, every layer's state there, mean-pooled states and span log-probs of sequences
    that share a prefix, in batches of mixed lengths, against one unpadded Hugging Face forward per sequence."""
    model = tiny_teacher[0] if which == "tiny" else tiny_gpt2()
    engine = TorchEngine(model, FLOAT32)
    rng = np.random.default_rng(0)
    shared = [int(t) for t in rng.integers(3, 200, 9)]
    sequences = [shared + [int(t) for t in rng.integers(3, 200, length)] for length in (1, 6, 3, 9, 2)]
    vocab = [5, 77, 150]
    layers = model.config.num_hidden_layers
    for layer in (0, 1, layers, -1):
        out = engine.read(sequences, layer=layer, vocab=vocab, batch_size=2)
        pooled = engine.read(sequences, layer=layer, mean_pool=True, batch_size=3).states
        for row, sequence in enumerate(sequences):
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([sequence]), output_hidden_states=True)
            np.testing.assert_allclose(out.logits[row], alone.logits[0, -1, vocab].numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(out.states[row], alone.hidden_states[layer][0, -1].numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(pooled[row], alone.hidden_states[layer][0].mean(0).numpy(), atol=1e-4, rtol=1e-4)
    starts = [len(shared) + 1, len(shared), len(shared) + 2, len(shared) + 4, len(shared) + 1]
    spans = engine.read(sequences, span_starts=starts, positions=[s - 1 for s in starts], layer=1, batch_size=2)
    for row, (sequence, start) in enumerate(zip(sequences, starts)):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0].float(), dim=-1)
        expected = (
            logprobs[start - 1 : len(sequence) - 1].gather(-1, torch.tensor(sequence[start:])[:, None]).squeeze(-1)
        )
        np.testing.assert_allclose(spans.span_logprobs[row], expected.numpy(), atol=1e-4, rtol=1e-4)


def test_fixed_seeds_reproduce_and_the_batch_size_changes_no_row(tiny_teacher):
    """Continuous batching refills the slots of finished rows and compacts at the end: with a row's own
    seed its tokens are the same whatever batch it ran in. Rows stop at their first stop token."""
    model, tokenizer = tiny_teacher
    engine = TorchEngine(model, FLOAT32)
    prompt = prompt_of(model, tokenizer("Review:").input_ids)
    free = SamplingParams(20, (tokenizer.eos_token_id,), top_p=0.9, temperature=1.0)
    seeds = row_seeds(7, 12)
    first = engine.generate(prompt, seeds, free, tokenizer.pad_token_id, batch_size=12)
    again = engine.generate(prompt, seeds, free, tokenizer.pad_token_id, batch_size=12)
    torch.testing.assert_close(first.token_ids, again.token_ids, rtol=0, atol=0)
    assert not torch.equal(
        first.token_ids, engine.generate(prompt, row_seeds(8, 12), free, tokenizer.pad_token_id).token_ids
    )
    # Stop tokens that the rows reach at different steps: each row ends at its first, what came before unchanged.
    stops = {int(first.token_ids[row, 2 + row % 9]) for row in range(0, 12, 2)}
    stopped = SamplingParams(20, tuple(stops), top_p=0.9, temperature=1.0)
    for batch_size in (12, 5, 1):
        out = engine.generate(prompt, seeds, stopped, tokenizer.pad_token_id, batch_size=batch_size)
        for row in range(12):
            tokens = first.token_ids[row].tolist()
            length = min([tokens.index(stop) + 1 for stop in stops if stop in tokens], default=20)
            assert int(out.lengths[row]) == length
            assert out.token_ids[row, :length].tolist() == tokens[:length]
            assert (out.token_ids[row, length:] == tokenizer.pad_token_id).all()
        assert len(set(out.lengths.tolist())) > 2  # rows of different lengths


def test_top_p_keeps_what_hugging_faces_warper_keeps_and_draws_only_from_it():
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 500, generator=generator)
    for top_p in (0.3, 0.9, 0.95):
        warped = TopPLogitsWarper(top_p)(None, logits.clone())
        expected = torch.isfinite(warped)
        probs = torch.softmax(logits, dim=-1)
        ordered, index = probs.sort(dim=-1, descending=True)
        kept = torch.zeros_like(expected).scatter(1, index, top_p_keep(ordered, top_p))
        assert torch.equal(kept, expected)
        # Draws land in the nucleus, at its renormalised frequencies (many rows of one distribution).
        row = logits[:1].expand(20_000, -1)
        drawn = next_tokens(
            row, SamplingParams(1, (), top_p=top_p), row_seeds(3, 20_000), np.zeros(20_000, dtype=np.int64)
        )
        assert expected[0, drawn].all()
        nucleus = torch.softmax(warped[0], dim=-1)
        frequencies = torch.bincount(drawn, minlength=500).float() / len(drawn)
        assert (frequencies - nucleus).abs().max() < 0.02


def test_top_k_then_top_p_keep_what_hugging_faces_warpers_keep_ties_included():
    """Hugging Face's `generate` samples with top-k 50 unless told otherwise, then top-p; so does the engine
    (`generate.top_k`, `ppo.top_k`). Logits in bfloat16 steps tie often: ties with the k-th token stay."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(32, 800, generator=generator)).bfloat16().float()  # coarse steps: ties
    for top_k, top_p, temperature in ((50, 0.95, 1.0), (5, 0.5, 0.7), (50, 1.0, 1.3)):
        scaled = logits / temperature
        expected = (
            TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, scaled.clone()))
            if top_p < 1
            else TopKLogitsWarper(top_k)(None, scaled.clone())
        )
        params = SamplingParams(1, (), top_p=top_p, temperature=temperature, top_k=top_k)
        found = engine_module.candidates(logits, params)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter(1, found.tokens, found.probs > 0)
        for row in range(len(logits)):
            # Which of two tied tokens the nucleus's edge keeps is the sort's choice: compare the kept values.
            mine, theirs = (
                logits[row][kept[row]].sort().values,
                logits[row][torch.isfinite(expected[row])].sort().values,
            )
            assert torch.equal(mine, theirs)
            probs = found.probs[row][found.probs[row] > 0]
            torch.testing.assert_close(
                (probs / probs.sum()).sort().values,
                torch.softmax(expected[row], -1)[torch.isfinite(expected[row])].sort().values,
            )
        row = logits[:1].expand(20_000, -1)
        drawn = next_tokens(row, params, row_seeds(5, 20_000), np.zeros(20_000, dtype=np.int64))
        frequencies = torch.bincount(drawn, minlength=800).float() / len(drawn)
        nucleus = torch.zeros(800).scatter(0, found.tokens[0], found.probs[0] / found.probs[0].sum())
        assert (frequencies - nucleus).abs().max() < 0.02 and (frequencies[nucleus == 0] == 0).all()


def test_a_nucleus_that_draws_rarely_reach_is_sorted_instead():
    """Top-p redraws a row whose draw falls outside the nucleus; a row whose nucleus holds little of the
    mass (here one token of 2%) takes the sorted path after a few draws, with the same result."""
    logits = torch.zeros(64, 2000)
    logits[:, 7] = math.log(0.02 * 1999 / 0.98)
    params = SamplingParams(1, (), top_p=0.01, temperature=1.0)
    drawn = next_tokens(logits, params, row_seeds(0, 64), np.zeros(64, dtype=np.int64))
    assert (drawn == 7).all()
    hot = next_tokens(
        logits, SamplingParams(1, (), top_p=0.01, temperature=0.25), row_seeds(0, 64), np.zeros(64, dtype=np.int64)
    )
    assert (hot == 7).all()


def test_auto_precision_resolves_per_hardware_and_a_named_dtype_is_forced(monkeypatch):
    for flags, expected in (
        ({"avx2"}, "float32"),
        ({"avx512_bf16"}, "bfloat16"),
        ({"amx_bf16", "avx512_bf16"}, "bfloat16"),
    ):
        monkeypatch.setattr(engine_module, "cpu_flags", lambda flags=flags: frozenset(flags))
        resolved = resolve_precision("auto", "cpu").names()
        assert resolved == dict(
            zip(
                ("decode", "read", "score"),
                engine_module.AUTO_PRECISION[engine_module.hardware_class(torch.device("cpu"))],
            )
        )
        assert resolved["decode"] == expected
        assert (
            engine_module.load_dtype("auto", "cpu") == torch.float32
        )  # CPUs keep float32 weights, bf16 copies per use
        assert engine_module.load_dtype("auto", "cpu", training="fp32") == getattr(
            torch, resolved["score"]
        )  # prompt tuning
        assert resolve_precision("float32", "cpu").names() == {
            "decode": "float32",
            "read": "float32",
            "score": "float32",
        }


def test_bfloat16_reads_close_to_float32(packaged_teacher):
    model, tokenizer = packaged_teacher
    bf16 = TorchEngine(model, resolve_precision("bfloat16", "cpu"))
    fp32 = TorchEngine(model, FLOAT32)
    texts = [
        f"Is this movie review positive or negative? A {word} film. Answer:"
        for word in ("wonderful", "dull", "moving", "terrible")
    ]
    sequences = tokenizer(texts).input_ids
    vocab = [
        tokenizer(" positive", add_special_tokens=False).input_ids[0],
        tokenizer(" negative", add_special_tokens=False).input_ids[0],
    ]
    low, high = bf16.read(sequences, vocab=vocab).logits, fp32.read(sequences, vocab=vocab).logits
    assert bf16.runner(torch.bfloat16).dtype == torch.bfloat16
    np.testing.assert_allclose(torch.softmax(torch.tensor(low), -1), torch.softmax(torch.tensor(high), -1), atol=0.05)
