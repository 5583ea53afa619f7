"""What the harness does with a loaded model: :class:`Engine`, and the q/k capture of every layer.

:class:`Engine` runs greedy generation of a left-padded batch with the prefill timed on its own, perplexity over
a window (logits in chunks, so a 152 K vocabulary at 32 K tokens fits), the next-token agreement of a run with a
baseline's log-probabilities (KL, top-1), and a capture of every layer's post-RoPE q/k.

The KV cache goes from one forward to the next under the name the model's ``forward`` takes (``cache`` in
transformers >= 5.2x, ``past_key_values`` before), so no deprecation warning is raised on either version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sparseflash.eval.capture import capture_attention

if TYPE_CHECKING:
    from sparseflash.eval.model import LoadedModel

END_POSITIONS = 256  # agreement's kl_end/top1_end: the final positions (the default exact tail of a sparse prefill)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_argument(model: Any) -> str:
    """The keyword a forward takes the KV cache under: ``cache`` (transformers >= 5.2x) or ``past_key_values``.

    transformers renamed the argument and the output field; passing the old name to a new version warns, so the
    harness asks the model's own ``forward`` signature.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under the new (``cache``) or old (``past_key_values``) field name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@dataclass
class Generation:
    """A greedy answer: ``text`` (new tokens decoded), ``tokens`` (their ids), timings in ms, ``new_tokens``.

    In a batch, ``prefill_ms`` and ``decode_ms`` are the batch's times divided by the batch size.
    """

    text: str
    prefill_ms: float
    decode_ms: float
    new_tokens: int
    tokens: list[int] = field(default_factory=list)
    batch_size: int = 1


@dataclass
class BatchInputs:
    """A left-padded batch: ``input_ids`` (B, S) int64, ``attention_mask`` (B, S) int64 (0 on padding) and
    ``position_ids`` (B, S) int64 (0 .. n_i - 1 on each sequence's own tokens); mask and positions are None for a
    single sequence, which runs exactly as it would alone."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None

    def forward_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            kw.update(attention_mask=self.attention_mask, position_ids=self.position_ids)
        return kw


@dataclass
class _Row:
    """Decoding state of one sequence of a batch."""

    max_new: int
    done: Callable[[str], bool] | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False


class Engine:
    """Runs a :class:`LoadedModel` for the tasks (greedy, no sampling; batches left-padded)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        eos = (
            getattr(self.model.generation_config, "eos_token_id", None)
            if hasattr(self.model, "generation_config")
            else None
        )
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0)
        self.cache_arg = cache_argument(self.model)

    def encode(self, text: str, max_tokens: int | None = None) -> torch.Tensor:
        """(1, S) int64 token ids of ``text`` (with the tokenizer's own special tokens), cut to ``max_tokens``."""
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if max_tokens is not None:
            ids = ids[:, :max_tokens]
        return ids.to(self.device)

    def batch(self, prompts: list[torch.Tensor]) -> BatchInputs:
        """Left-pad ``prompts`` (each (1, S_i) or (S_i,) int64) with the pad token (EOS if the tokenizer has none).

        Raises:
            ValueError: no prompts, or an empty one.
        """
        rows = [p.reshape(-1) for p in prompts]
        if not rows or any(r.numel() == 0 for r in rows):
            raise ValueError(
                f"prompts: expected one or more non-empty token sequences, got lengths {[r.numel() for r in rows]}"
            )
        if len(rows) == 1:
            return BatchInputs(rows[0][None].to(self.device), None, None)
        width = max(r.numel() for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            ids[b, width - r.numel() :] = r.to(self.device)
            mask[b, width - r.numel() :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return BatchInputs(ids, mask, positions)

    @torch.inference_mode()
    def prefill_ms(self, ids: torch.Tensor | BatchInputs) -> float:
        """Time of one prompt forward (the time to first token) of ``ids`` (1, S) or a padded batch, in ms."""
        inputs = ids if isinstance(ids, BatchInputs) else BatchInputs(ids, None, None)
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(**inputs.forward_kwargs(), use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, done: Callable[[str], bool] | None = None) -> Generation:
        """Greedy decoding from ``ids`` (1, S); stops at EOS, at ``max_new_tokens`` or once ``done(text)``.

        ``done`` lets string-match tasks stop once every reference is in the answer: the score cannot change
        after that (substring scoring), only the time spent rambling.
        """
        return self.generate_batch([ids], [max_new_tokens], [done])[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: list[torch.Tensor],
        max_new_tokens: list[int] | int,
        done: list[Callable[[str], bool] | None] | None = None,
    ) -> list[Generation]:
        """Greedy decoding of a batch: one left-padded prefill, then one token per sequence per step.

        Args:
            prompts: B token sequences, each (1, S_i) or (S_i,) int64; lengths may differ.
            max_new_tokens: the generation budget, one for all or one per sequence.
            done: per sequence, an optional ``done(text)`` that stops it early (see :meth:`generate`).

        Returns:
            B :class:`Generation`, in order; each sequence stops at EOS (not included), its budget or ``done``,
            and the batch stops once all have. Times are the batch's divided by B.

        Raises:
            ValueError: list lengths that do not match ``prompts``; a budget < 1.
        """
        n = len(prompts)
        budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        stops = list(done) if done is not None else [None] * n
        if len(budgets) != n or len(stops) != n:
            raise ValueError(
                f"max_new_tokens, done: expected {n} entries (one per prompt), got {len(budgets)} and {len(stops)}"
            )
        if any(b < 1 for b in budgets):
            raise ValueError(f"max_new_tokens: expected >= 1, got {budgets}")
        rows = [_Row(b, d) for b, d in zip(budgets, stops, strict=True)]
        inputs = self.batch(prompts)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(**inputs.forward_kwargs(), use_cache=True, logits_to_keep=1)
        _sync(self.device)
        t1 = time.perf_counter()
        self._decode(out, inputs, rows)
        _sync(self.device)
        t2 = time.perf_counter()
        prefill, decode = 1000 * (t1 - t0) / n, 1000 * (t2 - t1) / n
        return [
            Generation(
                text=r.text,
                prefill_ms=prefill,
                decode_ms=decode,
                new_tokens=len(r.tokens),
                tokens=r.tokens,
                batch_size=n,
            )
            for r in rows
        ]

    def _decode(self, out: Any, inputs: BatchInputs, rows: list[_Row]) -> None:
        """Greedy steps after the prefill ``out`` until every row has finished (updates ``rows`` in place)."""
        cache = returned_cache(out)
        mask, positions = inputs.attention_mask, inputs.position_ids
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
        while True:
            for row, token in zip(rows, nxt.tolist(), strict=True):
                self._step(row, token)
            if all(r.finished for r in rows):
                return
            kw: dict[str, Any] = {"input_ids": nxt[:, None], self.cache_arg: cache, "use_cache": True}
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                positions = positions[:, -1:] + 1
                kw.update(attention_mask=mask, position_ids=positions)
            out = self.model(**kw)
            cache = returned_cache(out)
            nxt = out.logits[:, -1].argmax(-1)

    def _step(self, row: _Row, token: int) -> None:
        """Take one greedy token into ``row`` (a finished row ignores it)."""
        if row.finished:
            return
        if token in self.eos_ids:
            row.finished = True
            return
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        row.finished = len(row.tokens) >= row.max_new or (row.done is not None and row.done(row.text))

    def _window_hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Final hidden states (1, S, H) of one forward through the decoder (no cache, no lm head), and its ms."""
        decoder = self.model.get_decoder()
        _sync(self.device)
        t0 = time.perf_counter()
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        _sync(self.device)
        return hidden, 1000 * (time.perf_counter() - t0)

    @torch.inference_mode()
    def perplexity(self, ids: torch.Tensor, last_tokens: int, chunk: int = 2048) -> dict[str, float]:
        """Full-context perplexity of ``ids`` (1, S): one forward, logits in chunks of ``chunk`` positions.

        Returns:
            ``ppl`` over the S - 1 predicted tokens, ``ppl_last`` over the last ``last_tokens`` of them, ``nll``
            (mean, natural log) and ``prefill_ms`` (the forward through the decoder, lm head excluded).
        """
        head = self.model.get_output_embeddings()
        hidden, ms = self._window_hidden(ids)
        targets = ids[0, 1:]
        nll = torch.empty(targets.numel(), dtype=torch.float64, device=self.device)
        for s in range(0, targets.numel(), chunk):
            e = min(s + chunk, targets.numel())
            logits = head(hidden[0, s:e]).float()
            nll[s:e] = torch.nn.functional.cross_entropy(logits, targets[s:e], reduction="none").double()
        last = max(1, min(last_tokens, nll.numel()))
        mean_all, mean_last = float(nll.mean()), float(nll[-last:].mean())
        return {"ppl": math.exp(mean_all), "ppl_last": math.exp(mean_last), "nll": mean_all, "prefill_ms": ms}

    @torch.inference_mode()
    def agreement(
        self,
        ids: torch.Tensor,
        last_tokens: int,
        reference: torch.Tensor | None = None,
        keep: bool = False,
        chunk: int = 256,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Next-token distributions over the last positions of ``ids``, compared with a reference's.

        One forward of ``ids`` (1, S); the positions are the last ``P = min(last_tokens, S - 1)`` that have a next
        token (S - 1 - P .. S - 2, the ones ``ppl_last`` of :meth:`perplexity` scores). Log-probabilities are
        taken in float32 (``log_softmax`` of the lm head's logits), ``chunk`` positions at a time, so a 152 K
        vocabulary at P = 1024 needs one (P, V) float32 tensor at most (only with ``keep``).

        Args:
            ids: (1, S) int64, S >= 2.
            last_tokens: P, the number of compared positions (clipped to S - 1).
            reference: (P, V) float32 log-probabilities of the baseline on the same ids (on the model's device),
                or None: the run is the baseline itself (``kl`` 0.0, ``top1`` 1.0).
            keep: also return this run's (P, V) float32 log-probabilities (the baseline keeps them).
            chunk: positions per lm-head call, at most 256.

        Returns:
            ``({"kl", "top1", "kl_end", "top1_end", "ppl_window", "positions", "prefill_ms"}, log_probs or
            None)``: ``kl`` is the mean KL(reference || this run) in nats, ``top1`` the fraction of positions
            whose argmax matches, ``kl_end``/``top1_end`` the same over the final :data:`END_POSITIONS` positions
            (those a sparse prefill with the default ``dense_last_queries`` computes exactly: what they measure is
            the quality of the KV cache the prefill leaves for decoding), ``ppl_window`` this run's perplexity on
            the positions' next tokens.

        Raises:
            ValueError: S < 2, ``last_tokens`` < 1, ``chunk`` outside [1, 256], or a reference of another shape.
        """
        seq = int(ids.shape[-1])
        if ids.ndim != 2 or ids.shape[0] != 1 or seq < 2:
            raise ValueError(f"ids: expected shape (1, S) with S >= 2, got {tuple(ids.shape)}")
        if last_tokens < 1 or not 1 <= chunk <= 256:
            raise ValueError(f"last_tokens, chunk: expected >= 1 and in [1, 256], got {last_tokens}, {chunk}")
        positions = min(last_tokens, seq - 1)
        head = self.model.get_output_embeddings()
        hidden, ms = self._window_hidden(ids)
        hidden = hidden[0, seq - 1 - positions : seq - 1]  # (P, H)
        targets = ids[0, seq - positions :]  # (P,)
        vocab = int(head.weight.shape[0])
        if reference is not None and tuple(reference.shape) != (positions, vocab):
            raise ValueError(
                f"reference: expected log-probabilities of shape {(positions, vocab)}, got {tuple(reference.shape)}"
            )
        kept = torch.empty((positions, vocab), dtype=torch.float32, device=self.device) if keep else None
        kl_rows = torch.zeros(positions, dtype=torch.float64, device=self.device)
        agree_rows = torch.ones(positions, dtype=torch.float64, device=self.device)
        nll_sum = 0.0
        for s in range(0, positions, chunk):
            e = min(s + chunk, positions)
            logp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)  # (c, V) float32
            nll_sum += float(-logp.gather(-1, targets[s:e, None]).double().sum())
            if reference is not None:
                ref = reference[s:e]
                kl_rows[s:e] = kl_per_row(ref, logp).double()
                agree_rows[s:e] = (ref.argmax(-1) == logp.argmax(-1)).double()
            if kept is not None:
                kept[s:e] = logp
        end = min(END_POSITIONS, positions)
        result = {
            "kl": float(kl_rows.mean()),
            "top1": float(agree_rows.mean()),
            "kl_end": float(kl_rows[-end:].mean()),
            "top1_end": float(agree_rows[-end:].mean()),
            "ppl_window": math.exp(nll_sum / positions),
            "positions": positions,
            "prefill_ms": ms,
        }
        return result, kept

    @torch.inference_mode()
    def capture_qk(self, ids: torch.Tensor, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> float:
        """One forward of ``ids`` that hands every layer's q (1, Hq, S, D) and k (1, Hkv, S, D) to ``on_layer``.

        q and k are taken where the model calls its attention function (after RoPE and any q/k norm), through
        transformers' ``AttentionInterface``; the layer then runs as with ``sdpa``. Returns the forward's ms.
        """
        with capture_attention(self.model, on_layer):
            _sync(self.device)
            t0 = time.perf_counter()
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync(self.device)
        return 1000 * (time.perf_counter() - t0)


def kl_per_row(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || logp) per row, in nats: ``sum_v p_ref * (log p_ref - log p)``.

    Args:
        ref, logp: (N, V) float32 log-probabilities. Terms with p_ref == 0 count 0 (no 0 * -inf NaN).

    Returns:
        (N,) float32, >= 0 up to rounding; inf where ``logp`` is -inf on a token ``ref`` gives mass.
    """
    p = ref.exp()
    terms = p * (ref - logp)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
