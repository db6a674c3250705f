"""Decoding for the image-grounded decoder: greedy, nucleus sampling and beam search.

Semantics follow the original BLIP, which called transformers 4.15's `generate`:
- `max_length` / `min_length` count the prompt tokens ("[DEC] a picture of" is 4 of them);
- sampling applies repetition penalty and the min-length rule to the logits, then top-k (50, the 4.15 default) and
  top-p, then draws one token per row (an exponential race, not `torch.multinomial`: same distribution, other draws);
  greedy and beam search apply the same processors (beam search on log-probabilities);
- beam search keeps `num_beams` finished hypotheses scored by sum of log-probs / length ** length_penalty, where the
  length is the hypothesis without its [SEP] including the prompt (`beam_length="original"`); transformers >= 4.3x
  divides by the generated length including [SEP] instead (`beam_length="hf"`, used by the parity tests).

Sampling noise is counter-based: the Exp(1) variable of token v at step t of caption c of an image is a pure function
of (image seed, c, t, v), an integer hash (splitmix64) computed for the whole (rows, top-k) candidate set in one
vectorised op. No generator state, no Python loop over images: a caption depends only on its image, its seed and the
settings, never on the batch it is in, the batch size or the device (the hash and the uniforms are exact integer
arithmetic, bit-identical on CPU and GPU; only the final float64 log may differ in its last bit). The token id is
hashed, not its rank, so a token's draw does not depend on which other tokens made the top-k. This replaced one
torch.Generator per image (before issue 25): the same seed gives other captions than before, from the same
distribution.

Speed: the image is encoded once; the cross-attention keys/values are computed once per image and shared by all its
captions/beams. Self-attention keys/values go into a static cache preallocated to `max_length` (per layer,
(R, nh, max_length, hd)) and written in place at the step's position; a boolean mask hides the positions not yet
written, so every one-token step has the same shapes and can be captured: `compile="on"` wraps the step in
`torch.compile` (mode "reduce-overhead", i.e. CUDA graphs, on CUDA; the default mode on CPU). Beam search reorders the
cache rows in place. `use_cache=False` recomputes the whole prefix each step (the reference the cache is tested against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from blip.generation import GenerationConfig

NEG_INF = -float("inf")
# names the sampling noise, for run manifests: which draws made the captions (bump on any change of the draws)
SAMPLER = "counter-splitmix64/1"


# ----------------------------------------------------------------------------------------------------------------------
# Counter-based sampling noise: splitmix64 on int64 tensors. torch has no uint64 arithmetic: constants are written as
# their two's-complement int64 values, products wrap mod 2**64 as unsigned ones would, and a logical right shift is an
# arithmetic one with the sign-extended bits masked off.


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA = _i64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio)
_M1, _M2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words that scatters every input bit over the output."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def row_keys(seeds: torch.Tensor, per_row: int) -> torch.Tensor:
    """Image seeds (B,) int64 -> one key per row (B * per_row,): caption c of an image is keyed by output c of the
    splitmix64 stream seeded with the image seed."""
    c = torch.arange(per_row, device=seeds.device).repeat(seeds.shape[0])  # (R,) caption index within its image
    return _mix64(seeds.repeat_interleave(per_row) + (c + 1) * _GAMMA)


def exp_noise(keys: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise (R, k) float64 for candidate `tokens` (R, k) drawn at position `step`, rows keyed by `keys` (R,).

    Token v at step t reads output t * 2**32 + v of the row's splitmix64 stream; its top 53 bits give a uniform in
    (0, 1) and -log(u) the exponential. Nothing depends on other rows, other tokens or the device.
    """
    h = _mix64(keys[:, None] + ((step << 32) + tokens + 1) * _GAMMA)  # (R, k) int64
    u = (_shr(h, 11).double() + 0.5) * 2.0**-53  # (R, k) in (0, 1), exact
    return -torch.log(u)


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


def _sample(scores: torch.Tensor, top_k: int, top_p: float, keys: torch.Tensor, step: int) -> torch.Tensor:
    """Top-k, then top-p (the smallest set whose probability reaches p, at least one token), then one draw per row.

    Works on the k best logits only (no full-vocabulary sort). The draw is an exponential race, argmax(p_i / E_i)
    with E_i ~ Exp(1) from `exp_noise`, an exact categorical sample that, unlike `torch.multinomial`, is cheap for a
    30k vocabulary and needs no generator state.
    """
    k = top_k if 0 < top_k < scores.shape[-1] else scores.shape[-1]
    vals, idx = torch.topk(scores, k)  # (R, k), descending
    if top_p < 1.0:
        probs = vals.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass ranked above each token
        vals = vals.masked_fill(before >= top_p, NEG_INF)
    probs = vals.softmax(-1)  # (R, k)
    choice = (probs / exp_noise(keys, step, idx)).argmax(-1, keepdim=True)  # (R, 1)
    return idx.gather(1, choice).squeeze(1)


class _Finished:
    """The n best finished hypotheses of every image at once (transformers 4.15's BeamHypotheses, batched).

    Per image, n slots: tokens (B, n, max_length) padded with pad, lengths, scores (float64, as the reference's Python
    floats) and insertion stamps; `count` (B,) slots are filled. The reference keeps a Python list per image: a
    candidate enters when the list is not full or its score beats the worst (strictly), and an overfull list drops its
    worst, the earliest-inserted one on a tie; the winner is the first best in list (= insertion) order.
    """

    def __init__(self, B: int, n: int, max_length: int, pad: int, length_penalty: float, device: torch.device):
        self.n, self.pad, self.length_penalty, self.clock = n, pad, length_penalty, 0
        self.tokens = torch.full((B, n, max_length), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, n, dtype=torch.long, device=device)
        self.scores = torch.full((B, n), NEG_INF, dtype=torch.float64, device=device)
        self.stamps = torch.zeros(B, n, dtype=torch.long, device=device)  # insertion order, for ties
        self.count = torch.zeros(B, dtype=torch.long, device=device)

    def add(self, seqs: torch.Tensor, sum_logprobs: torch.Tensor, valid: torch.Tensor, length: int) -> None:
        """Insert candidates `seqs` (B, k, T) with `sum_logprobs` (B, k) where `valid` (B, k), all of one `length`.

        The k candidates of an image must come in non-increasing score order (beam search's rank order, one length
        per call). Then inserting them one by one, as the reference does, keeps the n best of held + candidates by
        score, and on equal scores: the first `n - count` valid candidates enter unconditionally and join the held
        ones, among which the later-inserted wins (an overfull list drops the earliest of its worst); each further
        candidate enters only if strictly better than the worst, so it loses a tie to all of those, and an earlier one
        beats a later one. One stable sort by (score, that tie rank) gives the same set, ties included.
        """
        B, k, T = seqs.shape
        n, dev = self.n, seqs.device
        # the reference divides a Python float by a Python float: float64 here, the same rounding
        score = (sum_logprobs.double() / (length**self.length_penalty)).masked_fill(~valid, NEG_INF)  # (B, k)
        q = valid.long().cumsum(1) - 1  # (B, k) insertion order among this call's candidates
        stamp = self.clock + q  # (B, k)
        self.clock += k
        held = torch.arange(n, device=dev)[None, :] < self.count[:, None]  # (B, n)
        unconditional = q < (n - self.count)[:, None]  # (B, k) the set still had room
        # tie rank within equal scores, smaller wins: held and unconditional by latest stamp, the rest by earliest
        big = self.clock + 1
        tie = torch.cat(
            [
                torch.where(held, -self.stamps, 2 * big),
                torch.where(valid, torch.where(unconditional, -stamp, big + stamp), 2 * big),
            ],
            dim=1,
        )  # (B, n + k); empty slots and invalid candidates (score -inf) last
        pool = torch.cat([self.scores.masked_fill(~held, NEG_INF), score], dim=1)  # (B, n + k)
        by_tie = tie.argsort(dim=1, stable=True)  # (B, n + k)
        by_score = pool.gather(1, by_tie).sort(dim=1, descending=True, stable=True).indices
        pick = by_tie.gather(1, by_score)[:, :n]  # (B, n) pool index of each kept slot, best first

        def take(held_vals: torch.Tensor, new_vals: torch.Tensor) -> torch.Tensor:
            both = torch.cat([held_vals, new_vals], dim=1)  # (B, n + k, ...)
            idx = pick.view(B, n, *([1] * (both.dim() - 2))).expand(B, n, *both.shape[2:])
            return both.gather(1, idx)

        seqs = F.pad(seqs.long(), (0, self.tokens.shape[2] - T), value=self.pad)  # (B, k, max_length)
        self.tokens = take(self.tokens, seqs)  # (B, n, max_length)
        self.lengths = take(self.lengths, torch.full_like(stamp, T))
        self.scores = pool.gather(1, pick)
        self.stamps = take(self.stamps, stamp)
        self.count = (self.count + valid.sum(1)).clamp(max=n)

    def is_done(self, best_sum_logprobs: torch.Tensor, length: int) -> torch.Tensor:
        """(B,) bool: the set is full and no live beam (best sum `best_sum_logprobs` (B,)) can beat its worst."""
        best = best_sum_logprobs.double() / (length**self.length_penalty)
        return (self.count == self.n) & (self.scores.min(dim=1).values >= best)

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image the best hypothesis (the earliest-inserted on a tie): tokens (B, max_length), lengths (B,)."""
        held = torch.arange(self.n, device=self.count.device)[None, :] < self.count[:, None]  # (B, n)
        top = self.scores.masked_fill(~held, NEG_INF).max(dim=1, keepdim=True).values  # (B, 1)
        first = self.stamps.masked_fill(~(held & (self.scores == top)), torch.iinfo(torch.long).max)
        pick = first.argmin(dim=1)  # (B,)
        rows = torch.arange(pick.shape[0], device=pick.device)
        return self.tokens[rows, pick], self.lengths[rows, pick]


# ----------------------------------------------------------------------------------------------------------------------
# The decoder step: full recompute (use_cache=False) or one token per step on a static cache


def resolve_compile(compile: str, device: torch.device) -> bool:
    """Whether to capture the decode step: "on", "off", or "auto" (on for CUDA, off elsewhere)."""
    if compile not in ("auto", "off", "on"):
        raise ValueError(f"compile must be 'auto', 'off' or 'on', got {compile!r}")
    return compile == "on" or (compile == "auto" and device.type == "cuda")


def _cached_step(decoder, tokens, positions, cache, cross, enc_mask) -> torch.Tensor:
    """Feed `tokens` (R, T) at `positions` (T,) through the static `cache`: last-position logits (R, V) in fp32."""
    logits, _ = decoder(
        tokens, None, encoder_attention_mask=enc_mask, cross_kv=cross, kv_cache=cache, cache_position=positions
    )
    return logits[:, -1].float()


_COMPILED: dict[str, Callable] = {}


def _compiled_step(device: torch.device) -> Callable:
    """`_cached_step` under torch.compile: CUDA graphs ("reduce-overhead") on CUDA, inductor's default on CPU."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_cached_step, mode=mode)
    return _COMPILED[mode]


def _static_buffers(decoder, cross, rows, max_length: int, static_address: bool) -> tuple[list, list]:
    """Self-attention caches (R, nh, max_length, hd) and the cross-attention K/V gathered per row, per layer.

    Kept on the decoder and reused while the shapes match, so a captured step keeps reading the same addresses from
    one batch to the next (CUDA graphs would otherwise copy the image keys/values into the graph at every step).
    """
    k0 = cross[0][0]  # (B, nh, L, hd), one per image
    R, (_, nh, L, hd) = rows.shape[0], k0.shape
    key = (R, nh, L, hd, max_length, len(cross), k0.dtype, k0.device, static_address)
    held = getattr(decoder, "_decode_buffers", None)
    if held is None or held[0] != key:
        held = decoder._decode_buffers = None  # free the old shape's buffers before allocating the new ones
        new = lambda T: k0.new_zeros(R, nh, T, hd)  # noqa: E731
        bufs = ([(new(max_length), new(max_length)) for _ in cross], [(new(L), new(L)) for _ in cross])
        if static_address:
            for t in (t for pairs in bufs for pair in pairs for t in pair):
                torch._dynamo.mark_static_address(t)
        held = (key, bufs)
        decoder._decode_buffers = held  # a plain attribute: not a buffer, not in the state dict
    cache, cross_buf = held[1]
    for (k, v), (kb, vb) in zip(cross, cross_buf):
        torch.index_select(k, 0, rows, out=kb)
        torch.index_select(v, 0, rows, out=vb)
    return cache, cross_buf


class _Steps:
    """Last-position logits (R, V) fp32 of the growing sequences `ids` (R, t), called once per step; `cross` holds the
    cross-attention K/V per image (B, nh, L, hd), `rows` (R,) the image of each row.

    With the cache, the first call feeds the prompt (eagerly: it has its own shape) and every later call feeds the one
    new token at its position (the fixed-shape step, compiled when asked). Beam search calls `reorder`.
    """

    def __init__(self, decoder, cross, rows, enc_mask, max_length: int, use_cache: bool, compiled: bool):
        self.decoder, self.enc_mask, self.fed = decoder, enc_mask, 0
        device = cross[0][0].device
        self.cuda_graphs = compiled and device.type == "cuda"
        if use_cache:
            self.cache, self.cross = _static_buffers(decoder, cross, rows, max_length, self.cuda_graphs)
        else:
            self.cache, self.cross = None, [(k[rows], v[rows]) for k, v in cross]
        self.positions = torch.arange(max_length, device=device)
        self.step = _compiled_step(device) if compiled else _cached_step

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # recompute the whole prefix
            logits, _ = self.decoder(ids, None, encoder_attention_mask=self.enc_mask, cross_kv=self.cross)
            return logits[:, -1].float()
        T = ids.shape[1]
        if self.fed == 0:
            out = _cached_step(self.decoder, ids, self.positions[:T], self.cache, self.cross, self.enc_mask)
        else:
            assert T == self.fed + 1, "the cached decoder is fed one token per step"
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # fresh (R, 1) and (1,) tensors: the same strides and offsets at every step
            tok, pos = ids[:, -1:].clone(), self.positions[T - 1 : T].clone()
            out = self.step(self.decoder, tok, pos, self.cache, self.cross, self.enc_mask)
            if self.cuda_graphs:
                out = out.clone()  # the graph's output buffer is overwritten by the next replay
        self.fed = T
        return out

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: cache row i := row rows[i], in place (the captured step keeps its addresses)."""
        for k, v in self.cache or []:
            k.copy_(k.index_select(0, rows))
            v.copy_(v.index_select(0, rows))


@torch.no_grad()
def generate_ids(
    decoder,
    encoder_states: torch.Tensor,
    prompt: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    generation: GenerationConfig | None = None,
    *,
    num_return: int = 1,
    seeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    beam_length: str = "original",
    length_penalty: float = 1.0,
    use_cache: bool = True,
    encoder_attention_mask: torch.Tensor | None = None,
    compile: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """encoder_states (B, L, Dv), prompt (B, T0) -> ids (B * num_return, T) (beam search: num_return must be 1).

    The decoding options are `generation` (default: GenerationConfig()) with `options` (its field names: sample,
    num_beams, max_length, ...) replacing some. Sampling seeds: `seeds` (B,) int64, one per image (caption c of
    image i draws from (seeds[i], c) alone, whatever else is in the batch); without them, B seeds are drawn from
    `generator` (or torch's global generator), so the captions then depend on the batch. `compile`: "auto" | "off"
    | "on" (see `resolve_compile`).
    """
    g = replace(generation or GenerationConfig(), **options)
    sample, num_beams, max_length, min_length = g.sample, g.num_beams, g.max_length, g.min_length
    top_p, top_k, repetition_penalty = g.top_p, g.top_k, g.repetition_penalty
    B = encoder_states.shape[0]
    device = encoder_states.device
    compiled = resolve_compile(compile, device)
    beams = 1 if sample or num_beams <= 1 else num_beams
    if beams > 1 and num_return != 1:
        raise ValueError("beam search returns one sequence per image")
    if isinstance(generator, list):
        raise TypeError("per-image generators are gone: pass seeds=torch.tensor([...]) (one int64 seed per image)")
    per_row = num_return if sample else beams
    rows = torch.arange(B, device=device).repeat_interleave(per_row)  # (R,) image of each row
    cross = decoder.bert.cross_kv(encoder_states)  # once per image, gathered for its rows by _Steps
    enc_mask = encoder_attention_mask[rows] if encoder_attention_mask is not None else None
    if enc_mask is not None and bool(enc_mask.all()):
        enc_mask = None  # nothing to mask: no mask in the step
    steps = _Steps(decoder, cross, rows, enc_mask, max_length, use_cache, compiled)
    ids = prompt[rows]  # (R, T0)
    if beams > 1:
        return _beam_search(
            steps, ids, B, beams, prompt.shape[1], eos_token_id, pad_token_id, max_length, min_length,
            repetition_penalty, beam_length, length_penalty,
        )  # fmt: skip

    keys = None
    if sample:
        if seeds is None:
            gen_device = generator.device if generator is not None else "cpu"
            seeds = torch.randint(0, 2**63 - 1, (B,), generator=generator, device=gen_device)
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        if seeds.shape != (B,):
            raise ValueError(f"seeds must have one int64 per image, shape ({B},), got {tuple(seeds.shape)}")
        keys = row_keys(seeds.to(device), per_row)  # (R,)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
    while ids.shape[1] < max_length:
        scores = steps(ids)  # (R, V)
        scores = _repetition_penalty(scores, ids, repetition_penalty)
        scores = _min_length(scores, ids.shape[1], min_length, eos_token_id)
        nxt = _sample(scores, top_k, top_p, keys, ids.shape[1]) if sample else scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        unfinished &= nxt != eos_token_id
        if not unfinished.any():
            break
    return ids


def _beam_search(
    steps, ids, B, nb, prompt_len, eos, pad, max_length, min_length, penalty, beam_length, length_penalty,
) -> torch.Tensor:  # fmt: skip
    """transformers 4.15's BeamSearchScorer (early_stopping=False) on all images at once: every step is batched tensor
    ops on the input's device; the only host sync per step is the "all images done" exit."""
    if beam_length not in ("original", "hf"):
        raise ValueError(f"beam_length must be 'original' or 'hf', got {beam_length!r}")
    device = ids.device
    finished = _Finished(B, nb, max_length, pad, length_penalty, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    beam_scores = torch.zeros(B, nb, device=device)
    beam_scores[:, 1:] = -1e9  # only the first beam is live at the start (all beams are identical)
    beam_scores = beam_scores.view(-1)  # (R,)
    first_row = torch.arange(B, device=device)[:, None] * nb  # (B, 1) row of each image's first beam

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
        top_scores, top_idx = torch.topk(next_scores, 2 * nb, dim=1)  # (B, 2nb), best first
        top_row, top_tok = first_row + top_idx // V, top_idx % V  # (B, 2nb) source row and token
        is_eos = top_tok == eos  # (B, 2nb)

        # an EOS among the top nb finishes its beam (the sequence without EOS), in images still running
        finishing = is_eos[:, :nb] & ~done[:, None]  # (B, nb)
        finished.add(ids[top_row[:, :nb]], top_scores[:, :nb], finishing, norm_len(cur_len + 1, True))
        # the nb best non-EOS candidates go on, in rank order (each beam has one EOS: 2nb always holds nb others)
        keep = is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :nb]  # (B, nb)
        new_scores = top_scores.gather(1, keep).masked_fill(done[:, None], 0.0)  # (B, nb)
        new_tokens = top_tok.gather(1, keep).masked_fill(done[:, None], pad)  # done images: pad on their first row
        new_rows = torch.where(done[:, None], first_row, top_row.gather(1, keep))
        done |= finished.is_done(top_scores[:, 0], norm_len(cur_len + 1, True))

        rows = new_rows.view(-1)  # (R,)
        beam_scores = new_scores.view(-1)
        ids = torch.cat([ids[rows], new_tokens.view(-1, 1)], dim=1)  # (R, cur_len + 1)
        steps.reorder(rows)
        if bool(done.all()):
            break

    # images still running: their live beams are candidates too (in rank order, so non-increasing scores)
    live = (~done)[:, None].expand(B, nb)  # (B, nb)
    finished.add(ids.view(B, nb, -1), beam_scores.view(B, nb), live, norm_len(ids.shape[1], False))
    seqs, lengths = finished.best()  # (B, max_length), (B,)
    T = min(int(lengths.max()) + 1, max_length)
    # an EOS right after each sequence shorter than max_length (length < T exactly then), pad after it
    at_end = torch.arange(T, device=device)[None, :] == lengths[:, None]  # (B, T)
    return torch.where(at_end, eos, seqs[:, :T])
