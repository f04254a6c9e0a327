"""Data-efficiency training utilities: curriculum ordering, uncertainty-based data selection and
gradient reuse for near-duplicate batches.

What these do and do not buy (see ORIGINAL_DESIGN.md 3.7):

* ``CurriculumLearningScheduler`` trains on the easiest fraction of the data first. Any "speedup"
  is fewer examples per epoch; whether it reaches the same quality is an empirical question. The
  difficulty is only as good as the scoring model: score with a reference model (any model with
  the same interface, e.g. a small pretrained one) or set ``rescore_every`` so that difficulties
  are recomputed with the model being trained instead of frozen at its random initialisation.
* ``ActiveLearningSelector``: for language-model pre-training labels are free, so this is
  uncertainty-based data selection. Scoring is batched (one forward per batch of the pool).
* ``GradientCachingTrainer`` reuses a stored gradient when a batch's key is close to a cached
  batch's key. This is BIASED: the reused gradient was computed at older parameters (a delayed
  gradient) and an adaptive optimizer's moments count it again. It saves compute only when the
  data really repeat (epochs over a small set, duplicated documents); the key is a centred
  bag-of-tokens so that unrelated natural-text batches do not look alike, and a hit skips the
  forward AND the backward.

Models may return logits (B, N, V) or a tuple whose first element is the logits (ACT models return
``(logits, ponder_cost)``), or an object with a ``.logits`` attribute; see :func:`model_logits`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["model_logits", "CurriculumLearningScheduler", "ActiveLearningSelector",
           "GradientCachingTrainer"]


def model_logits(output) -> Tensor:
    """The (B, N, V) logits in a model's output: the tensor itself, the first element of a tuple
    or list (ACT's ``(logits, ponder_cost)``), or ``output.logits``."""
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    else:
        raise TypeError("model output: expected logits (B, N, V), a tuple starting with them, or an "
                        f"object with .logits, got {type(output).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"model output: expected logits of shape (B, N, V), got {tuple(logits.shape)}")
    return logits


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _split_batch(batch) -> Tuple[Tensor, Optional[Tensor]]:
    """A collated batch -> (x (B, N), y (B, N) or None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(f"dataset items: expected x or (x, y) tensors, got {type(batch).__name__}")


class _TrainModeGuard:
    """Puts a model in eval mode and restores its previous mode on exit."""

    def __init__(self, model: nn.Module, train: bool = False):
        self.model, self.train = model, train

    def __enter__(self):
        self.was_training = self.model.training
        self.model.train(self.train)

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------
class CurriculumLearningScheduler:
    """Order a dataset of ``(x (N,), y (N,))`` examples from easy to hard and hand out growing
    easy-first subsets.

    Args:
        dataset: map-style dataset of (x, y) long tensors.
        model: the scoring model (see the module docstring on which model to use).
        difficulty_metric: 'perplexity' (exp of mean CE), 'loss' (mean CE) or 'entropy' (mean
            predictive entropy; needs no targets).
        device: where to score (default: the model's device).
        rescore_every: recompute the difficulties every this many epochs in
            ``get_curriculum_dataloader`` (None: score once).
    """

    METRICS = ("perplexity", "loss", "entropy")
    STRATEGIES = ("linear", "exponential", "root")

    def __init__(self, dataset: Dataset, model: nn.Module, difficulty_metric: str = "perplexity",
                 device=None, *, rescore_every: Optional[int] = None):
        if difficulty_metric not in self.METRICS:
            raise ValueError(f"difficulty_metric: expected one of {self.METRICS}, got {difficulty_metric!r}")
        if rescore_every is not None and (not isinstance(rescore_every, int) or rescore_every < 1):
            raise ValueError(f"rescore_every: expected None or an int >= 1, got {rescore_every!r}")
        self.dataset = dataset
        self.model = model
        self.difficulty_metric = difficulty_metric
        self.device = _resolve_device(model, device)
        self.rescore_every = rescore_every
        self.difficulties: Optional[Tensor] = None     # (n,) in dataset order
        self.sorted_indices: Optional[Tensor] = None   # (n,) easiest first
        self._scored_epoch: Optional[int] = None

    @torch.no_grad()
    def compute_difficulties(self, batch_size: int = 32) -> Tensor:
        """Score every example (batched, eval mode); returns (n,) float32 in dataset order and
        stores the easy-first order."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        scores = []
        with _TrainModeGuard(self.model, train=False):
            for batch in DataLoader(self.dataset, batch_size=batch_size, shuffle=False):
                x, y = _split_batch(batch)
                x = x.to(self.device)
                logits = model_logits(self.model(x)).float()
                if self.difficulty_metric == "entropy":
                    logp = torch.log_softmax(logits, dim=-1)
                    s = -(logp.exp() * logp).sum(-1).mean(-1)
                else:
                    if y is None:
                        raise ValueError(f"dataset: difficulty_metric={self.difficulty_metric!r} needs "
                                         "(x, y) examples, got x only")
                    ce = F.cross_entropy(logits.transpose(1, 2), y.to(self.device), reduction="none")
                    s = ce.mean(-1)
                    if self.difficulty_metric == "perplexity":
                        s = s.exp()
                scores.append(s.cpu())
        self.difficulties = torch.cat(scores) if scores else torch.empty(0)
        self.sorted_indices = torch.argsort(self.difficulties, stable=True)
        return self.difficulties

    @staticmethod
    def pace(progress: float, strategy: str) -> float:
        """Fraction of the data in use at ``progress`` in [0, 1]."""
        if strategy == "linear":
            return progress
        if strategy == "root":
            return math.sqrt(progress)
        if strategy == "exponential":  # slow start, fast finish; 0 -> 0, 1 -> 1
            return (math.exp(3.0 * progress) - 1.0) / (math.exp(3.0) - 1.0)
        raise ValueError(f"strategy: expected one of {CurriculumLearningScheduler.STRATEGIES}, got {strategy!r}")

    def curriculum_fraction(self, epoch: int, total_epochs: int, strategy: str = "linear",
                            min_fraction: float = 0.1) -> float:
        """Fraction of the (easiest) data used at 0-based ``epoch``; the last epoch uses all of it."""
        if not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs: expected an int >= 1, got {total_epochs!r}")
        if not isinstance(epoch, int) or not 0 <= epoch < total_epochs:
            raise ValueError(f"epoch: expected an int in [0, {total_epochs}), got {epoch!r}")
        if not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"min_fraction: expected a value in (0, 1], got {min_fraction!r}")
        return max(min_fraction, self.pace((epoch + 1) / total_epochs, strategy))

    def get_curriculum_dataloader(self, epoch: int, total_epochs: int, batch_size: int,
                                  shuffle: bool = True, strategy: str = "linear",
                                  min_fraction: float = 0.1, score_batch_size: int = 32) -> DataLoader:
        """DataLoader over the easiest ``ceil(fraction * n)`` examples for this epoch."""
        frac = self.curriculum_fraction(epoch, total_epochs, strategy, min_fraction)
        stale = (self.rescore_every is not None and self._scored_epoch is not None
                 and epoch - self._scored_epoch >= self.rescore_every)
        if self.difficulties is None or stale:
            self.compute_difficulties(score_batch_size)
            self._scored_epoch = epoch
        n = len(self.sorted_indices)
        k = min(n, max(1, math.ceil(frac * n)))
        subset = Subset(self.dataset, self.sorted_indices[:k].tolist())
        return DataLoader(subset, batch_size=batch_size, shuffle=shuffle)

    def get_difficulty_statistics(self) -> dict:
        """{min, max, mean, median, std, q25, q75, num_examples} of the difficulties."""
        if self.difficulties is None:
            raise RuntimeError("get_difficulty_statistics: call compute_difficulties() first")
        d = self.difficulties.double()
        if d.numel() == 0:
            raise RuntimeError("get_difficulty_statistics: the dataset is empty")
        q = torch.quantile(d, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        return {"min": d.min().item(), "max": d.max().item(), "mean": d.mean().item(),
                "median": q[1].item(), "std": d.std(unbiased=d.numel() > 1).item() if d.numel() > 1 else 0.0,
                "q25": q[0].item(), "q75": q[2].item(), "num_examples": d.numel()}

    def save_difficulties(self, path) -> None:
        if self.difficulties is None:
            raise RuntimeError("save_difficulties: call compute_difficulties() first")
        torch.save({"difficulties": self.difficulties, "metric": self.difficulty_metric}, path)

    def load_difficulties(self, path) -> Tensor:
        state = torch.load(path, weights_only=True)
        d = state["difficulties"]
        if d.numel() != len(self.dataset):
            raise ValueError(f"{path}: expected {len(self.dataset)} difficulties (the dataset size), got {d.numel()}")
        if state.get("metric") != self.difficulty_metric:
            raise ValueError(f"{path}: difficulties were computed with metric {state.get('metric')!r}, "
                             f"this scheduler uses {self.difficulty_metric!r}")
        self.difficulties = d
        self.sorted_indices = torch.argsort(d, stable=True)
        return d


# ---------------------------------------------------------------------------------------------
# Active learning (uncertainty-based selection)
# ---------------------------------------------------------------------------------------------
class ActiveLearningSelector:
    """Score examples by the model's predictive uncertainty and pick the most uncertain.

    Strategies (per token, averaged over the sequence; higher = more uncertain):
        'uncertainty': least confidence, 1 - max_v p(v)
        'margin': 1 - (p_top1 - p_top2)
        'entropy': -sum_v p(v) log p(v)
        'variation_ratio': 1 - (share of ``num_mc_samples`` dropout passes that agree with the
            modal argmax); the model runs in train mode (dropout on) for these passes.
    """

    STRATEGIES = ("uncertainty", "margin", "entropy", "variation_ratio")

    def __init__(self, model: nn.Module, selection_strategy: str = "uncertainty", device=None, *,
                 num_mc_samples: int = 5):
        if selection_strategy not in self.STRATEGIES:
            raise ValueError(f"selection_strategy: expected one of {self.STRATEGIES}, got {selection_strategy!r}")
        if not isinstance(num_mc_samples, int) or num_mc_samples < 2:
            raise ValueError(f"num_mc_samples: expected an int >= 2, got {num_mc_samples!r}")
        self.model = model
        self.selection_strategy = selection_strategy
        self.device = _resolve_device(model, device)
        self.num_mc_samples = num_mc_samples

    @torch.no_grad()
    def _scores(self, x: Tensor) -> Tensor:
        """x (B, N) -> (B,) float32 uncertainties."""
        x = x.to(self.device)
        if self.selection_strategy == "variation_ratio":
            with _TrainModeGuard(self.model, train=True):
                preds = torch.stack([model_logits(self.model(x)).argmax(-1)
                                     for _ in range(self.num_mc_samples)])           # (T, B, N)
            mode = preds.mode(dim=0).values
            agree = (preds == mode).float().mean(0)
            return (1.0 - agree).mean(-1).float().cpu()
        with _TrainModeGuard(self.model, train=False):
            logits = model_logits(self.model(x)).float()
        if self.selection_strategy == "entropy":
            logp = torch.log_softmax(logits, dim=-1)
            s = -(logp.exp() * logp).sum(-1)
        else:
            p = torch.softmax(logits, dim=-1)
            if self.selection_strategy == "uncertainty":
                s = 1.0 - p.max(-1).values
            else:  # margin
                top2 = p.topk(2, dim=-1).values if p.shape[-1] >= 2 else torch.cat([p, torch.zeros_like(p)], -1)
                s = 1.0 - (top2[..., 0] - top2[..., 1])
        return s.mean(-1).cpu()

    def compute_uncertainty(self, x: Tensor) -> float:
        """Uncertainty of one example x (N,) (or (1, N))."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"x: expected one example of shape (N,) or (1, N), got {tuple(x.shape)}")
        return self._scores(x)[0].item()

    def compute_uncertainties_batch(self, dataset: Dataset, batch_size: int = 32) -> Tensor:
        """(n,) uncertainties of every example, one forward per batch."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        out = [self._scores(_split_batch(b)[0]) for b in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
        return torch.cat(out) if out else torch.empty(0)

    def select_examples(self, pool: Dataset, num_select: int, batch_size: int = 32) -> Tuple[Tensor, Tensor]:
        """(indices (k,) long into ``pool``, their uncertainties (k,)), most uncertain first."""
        n = len(pool)
        if not isinstance(num_select, int) or not 0 <= num_select <= n:
            raise ValueError(f"num_select: expected an int in [0, len(pool)={n}], got {num_select!r}")
        u = self.compute_uncertainties_batch(pool, batch_size)
        vals, idx = torch.topk(u, num_select)
        return idx, vals

    def create_active_dataloader(self, dataset: Dataset, num_select: int, batch_size: int = 32,
                                 shuffle: bool = True) -> DataLoader:
        idx, _ = self.select_examples(dataset, num_select, batch_size)
        return DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------
# Gradient caching
# ---------------------------------------------------------------------------------------------
class GradientCachingTrainer:
    """Train steps that reuse a cached gradient for a batch whose key matches a cached batch.

    Key (``embedding_method``):
        'token_histogram' (default): the batch's token counts (inputs and targets), centred by the
            mean key of all previous queries and compared by cosine. Centring removes the shared
            unigram profile of natural text, so only batches with the same unusual token mass (i.e.
            overlapping text) match.
        'mean_token' / 'cls_token': the centred mean / first-position token embedding
            (``model.token_embedding`` or ``model.get_input_embeddings()``).

    A hit applies the stored gradient with ``optimizer.step()`` and runs neither forward nor
    backward; the returned loss is then the cached batch's loss (stale: it is the loss at the
    parameters the gradient was computed at). Each entry is reused at most ``max_reuse`` times.
    Memory: ``cache_size`` flattened copies of the gradient.
    """

    METHODS = ("token_histogram", "mean_token", "cls_token")

    def __init__(self, model: nn.Module, cache_size: int = 100, similarity_threshold: float = 0.9,
                 embedding_method: str = "token_histogram", device=None, *, max_reuse: int = 1):
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size: expected an int >= 1, got {cache_size!r}")
        if not -1.0 <= float(similarity_threshold) <= 1.0:
            raise ValueError(f"similarity_threshold: expected a cosine in [-1, 1], got {similarity_threshold!r}")
        if embedding_method not in self.METHODS:
            raise ValueError(f"embedding_method: expected one of {self.METHODS}, got {embedding_method!r} "
                             "('last_hidden' is not offered: a hidden-state key needs the forward a hit should save)")
        if not isinstance(max_reuse, int) or max_reuse < 1:
            raise ValueError(f"max_reuse: expected an int >= 1, got {max_reuse!r}")
        self.model = model
        self.cache_size = cache_size
        self.similarity_threshold = float(similarity_threshold)
        self.embedding_method = embedding_method
        self.device = _resolve_device(model, device)
        self.max_reuse = max_reuse
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.clear_cache()
        self.reset_statistics()

    # -- keys ----------------------------------------------------------------------------------
    def _embedding_table(self) -> Tensor:
        emb = getattr(self.model, "token_embedding", None)
        if emb is None and hasattr(self.model, "get_input_embeddings"):
            emb = self.model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"embedding_method={self.embedding_method!r}: the model needs a "
                            "token_embedding (nn.Embedding) or get_input_embeddings()")
        return emb.weight

    @torch.no_grad()
    def compute_example_embedding(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The raw (uncentred) key of a batch x (B, N) [, y (B, N)], float32 (K,)."""
        if self.embedding_method == "token_histogram":
            toks = x.reshape(-1) if y is None else torch.cat([x.reshape(-1), y.reshape(-1)])
            if toks.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"x: token_histogram keys need integer tokens, got {toks.dtype}")
            V = self._vocab_size(toks)
            return torch.bincount(toks.long(), minlength=V).float() / max(1, toks.numel())
        W = self._embedding_table()
        e = W[x.to(W.device)]                                              # (B, N, D)
        return (e.mean(dim=(0, 1)) if self.embedding_method == "mean_token" else e[:, 0].mean(0)).float()

    def _vocab_size(self, toks: Tensor) -> int:
        v = getattr(self.model, "vocab_size", None)
        if not isinstance(v, int):
            try:
                v = self._embedding_table().shape[0]
            except TypeError:
                raise TypeError("token_histogram keys: the model needs an int vocab_size attribute or a "
                                "token_embedding (nn.Embedding) to size the histogram") from None
        if toks.numel() and (int(toks.min()) < 0 or int(toks.max()) >= v):
            raise ValueError(f"x/y: token ids must lie in [0, vocab_size={v}), got "
                             f"[{int(toks.min())}, {int(toks.max())}]")
        return v

    def compute_similarity(self, key: Tensor, keys: Tensor) -> Tensor:
        """Cosine between centred keys: key (K,), keys (M, K) -> (M,)."""
        c = self._key_sum / max(1, self._num_keys)
        return F.cosine_similarity((keys - c), (key - c).unsqueeze(0), dim=1, eps=1e-12)

    def find_similar_cached(self, key: Tensor) -> Optional[int]:
        """Index of the most similar reusable cache entry above the threshold, or None."""
        if self._keys is None or self._num_keys == 0:
            return None
        usable = self._reuse_left > 0
        sims = self.compute_similarity(key, self._keys)
        sims = torch.where(usable & self._filled, sims, torch.full_like(sims, -2.0))
        best = int(torch.argmax(sims))
        return best if sims[best].item() > self.similarity_threshold else None  # one host sync per query

    # -- cache ---------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._keys = None          # (cache_size, K)
        self._grads = None         # (cache_size, P) flattened gradients
        self._losses = None        # (cache_size,)
        self._filled = None        # (cache_size,) bool
        self._reuse_left = None    # (cache_size,) int
        self._next = 0
        self._key_sum = 0.0
        self._num_keys = 0

    def reset_statistics(self) -> None:
        self.cache_hits = 0
        self.cache_misses = 0

    def cache_gradients(self, key: Tensor, loss: float) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self._params]).detach()
        if self._keys is None:
            self._keys = key.new_zeros(self.cache_size, key.numel())
            self._grads = flat.new_zeros(self.cache_size, flat.numel())
            self._losses = torch.zeros(self.cache_size)
            self._filled = torch.zeros(self.cache_size, dtype=torch.bool, device=key.device)
            self._reuse_left = torch.zeros(self.cache_size, dtype=torch.long, device=key.device)
        i = self._next
        self._keys[i] = key
        self._grads[i] = flat
        self._losses[i] = loss
        self._filled[i] = True
        self._reuse_left[i] = self.max_reuse
        self._next = (i + 1) % self.cache_size  # FIFO ring

    def apply_cached_gradients(self, index: int) -> None:
        flat = self._grads[index]
        off = 0
        for p in self._params:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n
        self._reuse_left[index] -= 1

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, criterion,
                   force_compute: bool = False) -> Tuple[float, bool]:
        """One step on x (B, N), y (B, N); returns (loss, used_cache). ``criterion`` takes
        (logits (B*N, V), targets (B*N,))."""
        x = x.to(self.device)
        y = y.to(self.device)
        key = self.compute_example_embedding(x, y)
        hit = None if force_compute else self.find_similar_cached(key)
        self._key_sum = self._key_sum + key
        self._num_keys += 1
        if hit is not None:
            self.cache_hits += 1
            optimizer.zero_grad(set_to_none=True)
            self.apply_cached_gradients(hit)
            optimizer.step()
            return float(self._losses[hit]), True
        self.cache_misses += 1
        optimizer.zero_grad(set_to_none=True)
        logits = model_logits(self.model(x))
        loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        loss_value = loss.item()
        self.cache_gradients(key, loss_value)
        optimizer.step()
        return loss_value, False

    def get_cache_statistics(self) -> dict:
        """Counts of real hits (a cached gradient was applied, forward and backward skipped)."""
        total = self.cache_hits + self.cache_misses
        size = int(self._filled.sum()) if self._filled is not None else 0
        return {"cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "total_queries": total, "hit_rate": self.cache_hits / total if total else 0.0,
                "cache_size": size, "max_cache_size": self.cache_size,
                "forward_backward_passes_saved": self.cache_hits}
