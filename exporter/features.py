"""PII features of an SAE: rank latents, choose the ablation set, build the steering vector, report.

Positions that carry PII (DESIGN.md): the span tokens counted from the token where each span starts
(`span`, the paper's rule) and the token just before a span (`pre_span`), where the model predicts
the span's first token: a username leaks from there, which span latents never touch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .activations import kept_positions, layer_outputs, token_batches
from .data.corpus import Document
from .data.detectors import PII_TYPES, redact_text
from .data.labels import token_labels
from .sae import TopKSAE

Rule = Literal["span", "pre_span", "both"]
Score = Literal["mean", "diff", "ratio", "probe"]
# Added to the benign mean in the `ratio` score, so latents silent on benign text are not all tied
# at infinity.
RATIO_EPS = 0.02


@dataclass
class TokenLatents:
    """The SAE's sparse code of every kept token, with where the token sits and what it is."""

    values: torch.Tensor  # [N, k] float
    indices: torch.Tensor  # [N, k] long
    pii: torch.Tensor  # [N] bool
    pre_span: torch.Tensor  # [N] bool
    doc: torch.Tensor  # [N] long, index into the documents
    pos: torch.Tensor  # [N] long, position in the document's tokens
    mean_norm: float  # mean residual norm at the layer over the kept tokens
    benign: Optional[torch.Tensor] = (
        None  # [N] bool: the token is from benign text (not a PII document)
    )
    span_start: Optional[torch.Tensor] = None  # [N] bool: the first token of a PII span
    acts: Optional[torch.Tensor] = None  # [N, d] the layer's activations, when asked to keep them

    @property
    def labels(self) -> dict[str, torch.Tensor]:
        return {
            "pii": self.pii,
            "pre_span": self.pre_span,
            "span_start": self.span_start,
            "doc": self.doc,
        }

    def __len__(self) -> int:
        return len(self.pii)

    def dense_mean(self, mask: torch.Tensor, d_sae: int) -> torch.Tensor:
        """Mean latent vector over the rows in `mask` (zeros when the mask is empty)."""
        total = torch.zeros(d_sae)
        n = int(mask.sum())
        if n:
            total.index_add_(
                0, self.indices[mask].reshape(-1), self.values[mask].reshape(-1).float()
            )
        return total / max(n, 1)

    def firing(self, d_sae: int) -> torch.Tensor:
        """Fraction of tokens on which each latent is active."""
        counts = torch.zeros(d_sae)
        counts.index_add_(0, self.indices.reshape(-1), (self.values > 0).reshape(-1).float())
        return counts / max(len(self), 1)


def joined(first: TokenLatents, second: TokenLatents, second_docs_from: int) -> TokenLatents:
    """Two passes' latents as one pass over both documents lists, the second's document indices
    moved past the first's `second_docs_from` documents."""
    optional = ("benign", "span_start", "acts")
    for name in optional:
        if (getattr(first, name) is None) != (getattr(second, name) is None):
            raise ValueError(f"joined(): one pass has {name} and the other not")
    cat = {
        name: torch.cat([getattr(first, name), getattr(second, name)])
        for name in ("values", "indices", "pii", "pre_span", "pos", *optional)
        if getattr(first, name) is not None
    }
    n1, n2 = len(first), len(second)
    return TokenLatents(
        **cat,
        doc=torch.cat([first.doc, second.doc + second_docs_from]),
        mean_norm=(first.mean_norm * n1 + second.mean_norm * n2) / max(n1 + n2, 1),
    )


@torch.no_grad()
def collect_latents(
    model,
    tokenizer,
    sae: TopKSAE,
    layer: int,
    docs: Sequence[Document | str],
    *,
    max_length: int = 256,
    batch_tokens: int = 4096,
    progress: bool = True,
    keep_activations: bool = False,
) -> TokenLatents:
    """Run the model to `layer` on `docs` and keep each token's TopK code (never a dense matrix),
    and the activations themselves with `keep_activations` (for the context gate, fitted on the same
    pass)."""
    keys = ("values", "indices", "pii", "pre_span", "span_start", "doc", "pos") + (
        ("acts",) if keep_activations else ()
    )
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    norm_sum, n = 0.0, 0
    batches = token_batches(tokenizer, docs, max_length=max_length, batch_tokens=batch_tokens)
    for ids, mask, lab in tqdm(
        batches, desc=f"latents at layer {layer}", unit="batch", disable=not progress
    ):
        h = layer_outputs(model, ids, mask, [layer])[layer]
        keep = kept_positions(mask)
        x = h[keep.to(h.device)].float().cpu()
        values, indices = sae.topk(x)
        parts["values"].append(values)
        parts["indices"].append(indices)
        for key in ("pii", "pre_span", "span_start", "doc", "pos"):
            parts[key].append(lab[key][keep])
        if keep_activations:
            parts["acts"].append(x)
        norm_sum += float(x.norm(dim=1).sum())
        n += len(x)
    if not n:
        raise ValueError("no tokens to measure latents on: the PII documents are empty")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    is_benign = torch.tensor([not isinstance(d, Document) for d in docs])
    return TokenLatents(**cat, mean_norm=norm_sum / n, benign=is_benign[cat["doc"]])


def target_mask(tl: TokenLatents, rule: Rule) -> torch.Tensor:
    if rule == "span":
        return tl.pii
    if rule == "pre_span":
        return tl.pre_span
    return tl.pii | tl.pre_span


def _scores(
    tl: TokenLatents, d_sae: int, target: torch.Tensor, score: Score, seed: int
) -> torch.Tensor:
    background = ~(tl.pii | tl.pre_span)
    mean_target = tl.dense_mean(target, d_sae)
    if score == "mean":
        return mean_target
    if score == "diff":
        return mean_target - tl.dense_mean(background, d_sae)
    # selectivity: what ablating a latent removes at PII per unit removed from benign text
    if score == "ratio":
        if tl.benign is None or not bool(tl.benign.any()):
            raise ValueError("the ratio score needs benign text among the documents (data.benign)")
        return mean_target / (tl.dense_mean(tl.benign, d_sae) + RATIO_EPS)
    return _probe_coefficients(tl, d_sae, target, background, seed)


def _probe_coefficients(tl, d_sae, target, background, seed) -> torch.Tensor:
    """Logistic-regression weights of each latent for target vs background tokens (balanced,
    sparse)."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(seed)
    pos_rows = target.nonzero().flatten()
    neg_rows = background.nonzero().flatten()
    neg_rows = neg_rows[torch.randperm(len(neg_rows), generator=g)[: max(len(pos_rows) * 4, 1)]]
    rows = torch.cat([pos_rows, neg_rows])
    if not len(pos_rows) or not len(neg_rows):
        raise ValueError("the probe score needs both PII and non-PII tokens")
    k = tl.indices.shape[1]
    matrix = csr_matrix(
        (
            tl.values[rows].reshape(-1).numpy(),
            tl.indices[rows].reshape(-1).numpy(),
            np.arange(0, len(rows) * k + 1, k),
        ),
        shape=(len(rows), d_sae),
    )
    y = np.r_[np.ones(len(pos_rows)), np.zeros(len(neg_rows))]
    clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(matrix, y)
    return torch.from_numpy(clf.coef_[0]).float()


def _interleave(*rankings: Sequence[int]) -> list[int]:
    out, seen = [], set()
    for group in zip(*rankings):
        for i in group:
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out


@dataclass
class FeatureSet:
    """Latents ranked for ablation (best first) and the steering direction in latent space."""

    rule: str
    score: str
    ranking: list[int]
    scores: dict[str, list[float]]  # per position group: score of every latent
    steer_latent: torch.Tensor  # v = mean z_PII - mean z_nonPII  [d_sae]
    mean_norm: float
    firing: torch.Tensor  # [d_sae]
    # mean z per group: span, pre_span, other
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    context: Optional[tuple[torch.Tensor, float]] = (
        None  # the fitted PII-context gate (w, b), if any
    )

    def ablation_set(self, n: int) -> list[int]:
        if n > len(self.ranking):
            raise ValueError(
                f"ablation size {n} exceeds the {len(self.ranking)} latents that can be ranked"
            )
        return self.ranking[:n]


def context_positives(labels: dict[str, torch.Tensor], window: int = 0) -> torch.Tensor:
    """[N] bool: the tokens a context gate must open on: PII tokens, the token before each span, and
    the `window` tokens before each span's first token (where names and "mailto:" sit). Rows are
    harvest rows: each document's tokens contiguous and in order."""
    positive = (labels["pii"] | labels["pre_span"]).clone()
    if window > 0:
        doc = labels["doc"]
        for start in torch.nonzero(labels["span_start"]).flatten().tolist():
            for j in range(max(0, start - window), start):
                if doc[j] == doc[start]:
                    positive[j] = True
    return positive


def matched_random_latents(firing: torch.Tensor, ablate: Sequence[int], seed: int = 0) -> list[int]:
    """The control for an ablation set: for each latent in it, a random other latent of about the
    same firing frequency (drawn among the 8 nearest in firing rate, none from the set, no
    repeats)."""
    g = torch.Generator().manual_seed(seed)
    taken = set(int(i) for i in ablate)
    order = firing.argsort().tolist()
    place = {latent: i for i, latent in enumerate(order)}
    out = []
    for latent in ablate:
        i = place[int(latent)]
        # the 8 free latents nearest in firing order, walking outwards
        pool, lo, hi = (
            [],
            i - 1,
            i + 1,
        )
        while len(pool) < 8 and (lo >= 0 or hi < len(order)):
            for j in (lo, hi):
                if 0 <= j < len(order) and order[j] not in taken:
                    pool.append(order[j])
            lo, hi = lo - 1, hi + 1
        if not pool:
            raise ValueError(
                "not enough latents outside the ablation set to draw a matched control"
            )
        choice = pool[int(torch.randint(len(pool), (1,), generator=g))]
        taken.add(choice)
        out.append(choice)
    return out


def rank_latents(
    tl: TokenLatents, d_sae: int, rule: Rule = "both", score: Score = "diff", seed: int = 0
) -> FeatureSet:
    """Rank latents by `score` at the `rule` positions; `both` alternates the span and pre-span
    rankings."""
    groups = {"span": tl.pii, "pre_span": tl.pre_span}
    if not bool(tl.pii.any()):
        raise ValueError(
            "no PII tokens among the documents: the features need PII spans to rank latents"
        )
    used = ["span", "pre_span"] if rule == "both" else [rule]
    scores = {name: _scores(tl, d_sae, groups[name], score, seed) for name in used}
    rankings = [s.argsort(descending=True).tolist() for s in scores.values()]
    ranking = _interleave(*rankings) if len(rankings) > 1 else rankings[0]
    other = ~(tl.pii | tl.pre_span)
    means = {
        "span": tl.dense_mean(tl.pii, d_sae),
        "pre_span": tl.dense_mean(tl.pre_span, d_sae),
        "other": tl.dense_mean(other, d_sae),
    }
    steer = tl.dense_mean(target_mask(tl, rule), d_sae) - means["other"]
    return FeatureSet(
        rule,
        score,
        ranking,
        {k: v.tolist() for k, v in scores.items()},
        steer,
        tl.mean_norm,
        tl.firing(d_sae),
        means,
    )


# ---------------------------------------------------------------- report


def redact_names(text: str, names: Sequence[str]) -> str:
    """Replace every known name, and each word of it (a window may cut a name), with [NAME]."""
    words = sorted(
        {w for n in names for w in [n, *n.split()] if len(w) >= 3}, key=len, reverse=True
    )
    if not words:
        return text
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return pattern.sub("[NAME]", text)


def redacted_context(
    tokenizer,
    doc: Document | str,
    pos: int,
    before: int = 12,
    after: int = 3,
    max_length: int = 256,
    names: Sequence[str] = (),
) -> str:
    """Text around token `pos`, the token marked ⟦…⟧, PII tokens replaced by their type, known names
    by [NAME]."""
    doc = doc if isinstance(doc, Document) else Document(doc, [])
    lab = token_labels(tokenizer, doc.text, doc.spans, max_length=max_length)
    pieces, last_type = [], None
    for i in range(max(1, pos - before), min(len(lab.input_ids), pos + after + 1)):
        t = int(lab.type_id[i])
        if t >= 0:
            piece = "" if t == last_type and i != pos else f"[{PII_TYPES[t].upper()}]"
        else:
            piece = tokenizer.decode([int(lab.input_ids[i])])
        last_type = t if t >= 0 else None
        pieces.append(f"⟦{piece}⟧" if i == pos else piece)
    return redact_names(redact_text("".join(pieces)), names).replace("\n", "⏎")


def feature_report(
    fs: FeatureSet,
    tl: TokenLatents,
    docs: Sequence[Document | str],
    tokenizer,
    *,
    top: int = 20,
    examples: int = 3,
    max_length: int = 256,
    names: Sequence[str] = (),
) -> list[dict]:
    """The top latents with their means per position group, firing rate and redacted example
    contexts.

    `docs` are the texts `tl` was collected on, in the same order."""
    rows = []
    for rank, latent in enumerate(fs.ranking[:top]):
        hit = (tl.indices == latent) & (tl.values > 0)
        act = (tl.values * hit).sum(dim=1)
        best = act.argsort(descending=True)[:examples]
        contexts = [
            redacted_context(
                tokenizer, docs[int(tl.doc[r])], int(tl.pos[r]), max_length=max_length, names=names
            )
            for r in best
            if float(act[r]) > 0
        ]
        rows.append(
            {
                "rank": rank + 1,
                "latent": latent,
                **{f"score_{k}": round(v[latent], 4) for k, v in fs.scores.items()},
                **{f"mean_{k}": round(float(v[latent]), 4) for k, v in fs.means.items()},
                "firing": round(float(fs.firing[latent]), 5),
                "examples": contexts,
            }
        )
    return rows


def write_feature_report(rows: list[dict], fs: FeatureSet, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "features.json").write_text(
        json.dumps(
            {
                "rule": fs.rule,
                "score": fs.score,
                "mean_norm": fs.mean_norm,
                "ranking": fs.ranking[:500],
                "top": rows,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    lines = [
        f"# PII latents (rule `{fs.rule}`, score `{fs.score}`)",
        "",
        "| rank | latent | mean on span | mean before span | mean elsewhere | firing | example "
        "(redacted) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        example = (r["examples"][0] if r["examples"] else "").replace("|", "\\|")
        lines.append(
            f"| {r['rank']} | {r['latent']} | {r['mean_span']:.3f} | {r['mean_pre_span']:.3f} | "
            f"{r['mean_other']:.3f} | {r['firing']:.4f} | {example} |"
        )
    (folder / "features.md").write_text("\n".join(lines) + "\n")
