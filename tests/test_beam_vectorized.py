"""Batched beam search (blip/generate.py `_beam_search`, `_Finished`) against the per-image Python loop it replaced.

The reference below is the implementation before issue 25's GPU path, kept verbatim (transformers 4.15's
BeamSearchScorer/BeamHypotheses as the original BLIP used them). The batched one must give the same token ids,
ties included, on random tiny decoders over many seeds and settings.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import blip.generate as gen
from blip.config import TextConfig
from blip.generate import _Finished, _min_length, _repetition_penalty, generate_ids
from blip.model import BertLMHeadModel, init_weights

# -- the reference: the code before the rewrite, verbatim --------------------------------------------------------------


class _Hypotheses:
    """The n best finished beams of one image (transformers 4.15's BeamHypotheses)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, ids: torch.Tensor, sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / (length**self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / (length**self.length_penalty)


def reference_beam_search(
    steps, ids, B, nb, prompt_len, eos, pad, max_length, min_length, penalty, beam_length, length_penalty,
) -> torch.Tensor:  # fmt: skip
    if beam_length not in ("original", "hf"):
        raise ValueError(f"beam_length must be 'original' or 'hf', got {beam_length!r}")
    device = ids.device
    hyps = [_Hypotheses(nb, length_penalty) for _ in range(B)]
    done = [False] * B
    beam_scores = torch.zeros(B, nb, device=device)
    beam_scores[:, 1:] = -1e9  # only the first beam is live at the start (all beams are identical)
    beam_scores = beam_scores.view(-1)

    def norm_len(new_len: int, finished_by_eos: bool) -> int:
        if beam_length == "hf":
            return new_len - prompt_len
        return new_len - 1 if finished_by_eos else new_len

    while ids.shape[1] < max_length:
        cur_len = ids.shape[1]
        logits = steps(ids)  # (R, V)
        scores = F.log_softmax(logits, dim=-1)
        scores = _repetition_penalty(scores, ids, penalty)
        scores = _min_length(scores, cur_len, min_length, eos)
        V = scores.shape[-1]
        next_scores = (scores + beam_scores[:, None]).view(B, nb * V)
        top_scores, top_idx = torch.topk(next_scores, 2 * nb, dim=1)  # (B, 2nb)
        top_beam, top_tok = (top_idx // V).tolist(), (top_idx % V).tolist()
        top_scores_l = top_scores.tolist()

        new_scores, new_tokens, new_rows = [], [], []
        for b in range(B):
            if done[b]:
                new_scores += [0.0] * nb
                new_tokens += [pad] * nb
                new_rows += [b * nb] * nb
                continue
            kept = 0
            for rank in range(2 * nb):
                tok, sc, row = top_tok[b][rank], top_scores_l[b][rank], b * nb + top_beam[b][rank]
                if tok == eos:
                    if rank < nb:  # only a top-nb candidate may finish
                        hyps[b].add(ids[row].clone(), sc, norm_len(cur_len + 1, True))
                else:
                    new_scores.append(sc)
                    new_tokens.append(tok)
                    new_rows.append(row)
                    kept += 1
                if kept == nb:
                    break
            done[b] = hyps[b].is_done(max(top_scores_l[b]), norm_len(cur_len + 1, True))

        rows_t = torch.tensor(new_rows, device=device)
        beam_scores = torch.tensor(new_scores, device=device)
        ids = torch.cat([ids[rows_t], torch.tensor(new_tokens, device=device)[:, None]], dim=1)
        steps.reorder(rows_t)
        if all(done):
            break

    final_len = ids.shape[1]
    for b in range(B):
        if not done[b]:
            for j in range(nb):
                hyps[b].add(ids[b * nb + j].clone(), float(beam_scores[b * nb + j]), norm_len(final_len, False))
    best = [max(h.beams, key=lambda x: x[0])[1] for h in hyps]
    T = min(max(len(x) for x in best) + 1, max_length)
    out = torch.full((B, T), pad, dtype=torch.long, device=device)
    for b, seq in enumerate(best):
        out[b, : len(seq)] = seq
        if len(seq) < max_length:
            out[b, len(seq)] = eos
    return out


# -- the finished set alone: one-by-one insertion vs one batched ranking, on scores full of ties -----------------------


def test_finished_set_equals_sequential_insertion():
    rng = random.Random(0)
    for trial in range(300):
        B, n, lp = rng.randint(1, 4), rng.randint(1, 5), rng.choice([1.0, 0.5, 2.0])
        ref = [_Hypotheses(n, lp) for _ in range(B)]
        ours = _Finished(B, n, max_length=1, pad=0, length_penalty=lp, device=torch.device("cpu"))
        uid = 0
        for _ in range(rng.randint(1, 8)):
            k, length = rng.randint(1, 5), rng.randint(1, 4)
            # integer sums from a small range: ties everywhere; non-increasing per image, as beam search's rank order
            sums = torch.tensor([sorted((-rng.randint(0, 4) for _ in range(k)), reverse=True) for _ in range(B)])
            sums = sums.float()  # (B, k)
            valid = torch.rand(B, k, generator=torch.Generator().manual_seed(trial)) < 0.7
            seqs = torch.arange(uid, uid + B * k).view(B, k, 1)  # one unique id per candidate
            uid += B * k
            for b in range(B):
                for j in range(k):
                    if valid[b, j]:
                        ref[b].add(seqs[b, j], float(sums[b, j]), length)
            ours.add(seqs, sums, valid, length)
            best = torch.tensor([float(sums[b, 0]) for b in range(B)])
            for b in range(B):
                held = int(ours.count[b])
                order = ours.stamps[b, :held].argsort()  # our slots in insertion (= the reference's list) order
                assert ours.tokens[b, order, 0].tolist() == [int(ids) for _, ids in ref[b].beams], trial
                assert ours.scores[b, order].tolist() == [s for s, _ in ref[b].beams], trial
            assert ours.is_done(best, length + 1).tolist() == [h.is_done(float(best[b]), length + 1) for b, h in
                                                                enumerate(ref)]  # fmt: skip
        seqs, _ = ours.best()
        for b, h in enumerate(ref):
            if h.beams:
                assert int(seqs[b, 0]) == int(max(h.beams, key=lambda x: x[0])[1]), trial


# -- whole beam search on random tiny decoders -------------------------------------------------------------------------

V, EOS, PAD, BOS, WIDTH = 12, 3, 0, 1, 16


def tiny_decoder(kind: str) -> BertLMHeadModel:
    """A 1-layer decoder over a 12-token vocabulary. kind: "plain"; "eos" (EOS raised: hypotheses finish at various
    steps); "eos_high" (every image done early); "never" (EOS never chosen); "ties" (context-free integer logits:
    permuted sequences score exactly alike)."""
    torch.manual_seed({"plain": 0, "eos": 3.5, "eos_high": 2, "never": 3, "ties": 4}[kind])
    cfg = TextConfig(vocab_size=V, hidden_size=32, layers=1, heads=2, intermediate_size=64, max_position_embeddings=32,
                     encoder_width=WIDTH, pad_token_id=PAD, sep_token_id=EOS, bos_token_id=BOS)  # fmt: skip
    model = BertLMHeadModel(cfg)
    init_weights(model, std=0.5)
    bias = model.cls.predictions.bias
    with torch.no_grad():
        if kind == "ties":
            for p in model.parameters():
                p.zero_()
            bias.copy_(torch.tensor([0.0, -1, 1, 1, 1, 0, 0, 2, 2, 1, 0, 2]))  # several tokens per value
        bias[EOS] += {"plain": 0.0, "eos": 3.5, "eos_high": 6.0, "never": -40.0, "ties": 0.0}[kind]
    return model.eval()


KINDS = ["plain", "eos", "eos_high", "never", "ties"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: intra-op threads only add overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def decoders() -> dict[str, BertLMHeadModel]:
    return {k: tiny_decoder(k) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_equals_reference(decoders, kind, monkeypatch):
    decoder, rng = decoders[kind], random.Random(kind)
    ended_early, ran_to_max = 0, 0
    for case in range(60):
        B, nb, T0 = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 3)
        max_length = T0 + rng.randint(1, 12)
        kw = dict(
            num_beams=nb,
            max_length=max_length,
            min_length=rng.choice([0, T0 + 1, T0 + 3, max_length, max_length + 1]),
            repetition_penalty=rng.choice([1.0, 1.3]),
            beam_length=rng.choice(["original", "hf"]),
            length_penalty=rng.choice([1.0, 1.0, 0.6, 2.0]),
            use_cache=rng.random() < 0.5,
        )
        g = torch.Generator().manual_seed(case)
        states = torch.randn(B, rng.randint(1, 5), WIDTH, generator=g)  # (B, L, Dv)
        prompt = torch.cat([torch.full((B, 1), BOS), torch.randint(4, V, (B, T0 - 1), generator=g)], dim=1)
        args = (decoder, states, prompt, EOS, PAD)
        got = generate_ids(*args, **kw)
        with monkeypatch.context() as m:
            m.setattr(gen, "_beam_search", reference_beam_search)
            want = generate_ids(*args, **kw)
        assert torch.equal(got, want), (kind, case, kw, got, want)
        ended_early += got.shape[1] < max_length
        ran_to_max += bool((got[:, -1] != EOS).any()) and got.shape[1] == max_length
    # exercised: every image done before max_length (early exit) and images never done (live beams added at the end)
    if kind == "eos_high":
        assert ended_early > 10 and ran_to_max > 10
    if kind == "eos":
        assert ended_early >= 3 and ran_to_max > 30
    if kind == "never":
        assert ran_to_max == 60
