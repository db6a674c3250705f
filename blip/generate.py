"""Decoding for the image-grounded decoder: greedy, nucleus sampling and beam search.

Semantics follow the original BLIP, which called transformers 4.15's `generate`:
- `max_length` / `min_length` count the prompt tokens ("[DEC] a picture of" is 4 of them);
- sampling applies repetition penalty and the min-length rule to the logits, then top-k (50, the 4.15 default) and
  top-p, then draws one token per row (an exponential race, not `torch.multinomial`: same distribution, other draws); greedy and beam search apply the same processors (beam search on log-probabilities);
- beam search keeps `num_beams` finished hypotheses scored by sum of log-probs / length ** length_penalty, where the
  length is the hypothesis without its [SEP] including the prompt (`beam_length="original"`); transformers >= 4.3x
  divides by the generated length including [SEP] instead (`beam_length="hf"`, used by the parity tests).

Speed: the image is encoded once; the cross-attention keys/values are computed once per image and shared by all its
captions/beams; self-attention keys/values are cached so each step feeds one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -float("inf")


def _repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the sequence, prompt included (as transformers)."""
    if penalty == 1.0:
        return scores
    s = torch.gather(scores, 1, ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter_(1, ids, s)


def _min_length(scores: torch.Tensor, cur_len: int, min_length: int, eos: int) -> torch.Tensor:
    if cur_len < min_length:
        scores[:, eos] = NEG_INF
    return scores


def _sample(
    scores: torch.Tensor,
    top_k: int,
    top_p: float,
    generator: torch.Generator | list[torch.Generator] | None,
    per_row: int,
    active: torch.Tensor,
) -> torch.Tensor:
    """Top-k, then top-p (the smallest set whose probability reaches p, at least one token), then one draw per row.

    Works on the k best logits only (no full-vocabulary sort). The draw is an exponential race, argmax(p_i / E_i)
    with E_i ~ Exp(1), an exact categorical sample that, unlike `torch.multinomial`, is cheap for a 30k vocabulary.
    """
    k = top_k if 0 < top_k < scores.shape[-1] else scores.shape[-1]
    vals, idx = torch.topk(scores, k)  # (R, k), descending
    if top_p < 1.0:
        probs = vals.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass ranked above each token
        vals = vals.masked_fill(before >= top_p, NEG_INF)
    probs = vals.softmax(-1)
    if isinstance(generator, list):  # each image draws from its own stream, only while it has live rows
        noise = torch.ones_like(probs)
        for i, g in enumerate(generator):
            sl = slice(i * per_row, (i + 1) * per_row)
            if active[sl].any():
                noise[sl].exponential_(generator=g)
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / noise).argmax(-1, keepdim=True)  # (R, 1)
    return idx.gather(1, choice).squeeze(1)


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


def _step(decoder, ids, past, cross, enc_mask, use_cache):
    """One decoder call; returns last-position logits (R, V) in fp32 and the new cache."""
    inp = ids[:, -1:] if (use_cache and past is not None) else ids
    logits, presents = decoder(
        inp, None, encoder_attention_mask=enc_mask, past_key_values=past if use_cache else None, cross_kv=cross
    )
    return logits[:, -1].float(), (presents if use_cache else None)


@torch.no_grad()
def generate_ids(
    decoder,
    encoder_states: torch.Tensor,
    prompt: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    sample: bool = False,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    num_return: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    beam_length: str = "original",
    length_penalty: float = 1.0,
    use_cache: bool = True,
    encoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """encoder_states (B, L, Dv), prompt (B, T0) -> ids (B * num_return, T) (beam search: num_return must be 1).

    `generator` may be one torch.Generator for the batch or one per image (then each image's captions depend only on
    its own seed, not on what else is in the batch). It must live on the same device as the model.
    """
    B = encoder_states.shape[0]
    beams = 1 if sample or num_beams <= 1 else num_beams
    if beams > 1 and num_return != 1:
        raise ValueError("beam search returns one sequence per image")
    per_row = num_return if sample else beams
    rows = torch.arange(B, device=encoder_states.device).repeat_interleave(per_row)  # (R,) image of each row
    cross = [(k[rows], v[rows]) for k, v in decoder.bert.cross_kv(encoder_states)]  # once per image, shared by rows
    enc_mask = encoder_attention_mask[rows] if encoder_attention_mask is not None else None
    ids = prompt[rows]  # (R, T0)
    if beams > 1:
        return _beam_search(
            decoder, ids, cross, enc_mask, B, beams, prompt.shape[1], eos_token_id, pad_token_id, max_length,
            min_length, repetition_penalty, beam_length, length_penalty, use_cache,
        )  # fmt: skip

    gens = generator if isinstance(generator, list) else None
    if gens is not None and len(gens) != B:
        raise ValueError(f"got {len(gens)} generators for {B} images")
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    past = None
    while ids.shape[1] < max_length:
        scores, past = _step(decoder, ids, past, cross, enc_mask, use_cache)  # (R, V)
        scores = _repetition_penalty(scores, ids, repetition_penalty)
        scores = _min_length(scores, ids.shape[1], min_length, eos_token_id)
        if sample:
            nxt = _sample(scores, top_k, top_p, gens if gens is not None else generator, per_row, unfinished)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        unfinished &= nxt != eos_token_id
        if not unfinished.any():
            break
    return ids


def _beam_search(
    decoder, ids, cross, enc_mask, B, nb, prompt_len, eos, pad, max_length, min_length, penalty, beam_length,
    length_penalty, use_cache,
) -> torch.Tensor:  # fmt: skip
    if beam_length not in ("original", "hf"):
        raise ValueError(f"beam_length must be 'original' or 'hf', got {beam_length!r}")
    device = ids.device
    hyps = [_Hypotheses(nb, length_penalty) for _ in range(B)]
    done = [False] * B
    beam_scores = torch.zeros(B, nb, device=device)
    beam_scores[:, 1:] = -1e9  # only the first beam is live at the start (all beams are identical)
    beam_scores = beam_scores.view(-1)
    past = None

    def norm_len(new_len: int, finished_by_eos: bool) -> int:
        if beam_length == "hf":
            return new_len - prompt_len
        return new_len - 1 if finished_by_eos else new_len

    while ids.shape[1] < max_length:
        cur_len = ids.shape[1]
        logits, past = _step(decoder, ids, past, cross, enc_mask, use_cache)
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
        if past is not None:
            past = [(k[rows_t], v[rows_t]) for k, v in past]
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
