"""Free-text prompts -> catalog classes ("IVC and both kidneys" -> Postcava, Right Kidney, Left Kidney).

Resolution of each item, most reliable first:

1. **Split** the prompt into items at commas, semicolons, new lines, "&", "+" and the word "and" (unless the whole
   item is itself a name, e.g. "portal vein and splenic vein").
2. **Exact / synonym / group**: case-, space- and punctuation-insensitive match against the catalog's display names,
   upstream prompt names, file stems and synonyms, and against group words ("both kidneys", "lungs", "all organs",
   "all tumors", "all lesions", "adrenals", "femoral heads", "all vessels", "all"). Side words ("left"/"L"/"lt",
   "right"/"R"/"rt", "both"/"bilateral") combine with paired organs; plurals are reduced to singulars.
3. **Fuzzy** (typos): rapidfuzz ``token_sort_ratio`` against the same vocabulary; accepted only when the best score is
   at least :data:`FUZZY_CUTOFF` *and* beats the best candidate for any other class set by :data:`FUZZY_MARGIN`, and
   the text has at least :data:`FUZZY_MIN_LENGTH` characters (abbreviations must be exact).
4. **CLIP**: cosine similarity between the CLIP text feature of "A computerized tomography of a {text}" and the
   model's 32 class embeddings; the nearest class is accepted when the similarity is at least ``clip_threshold``
   (default :data:`CLIP_THRESHOLD`) and beats the runner-up by :data:`CLIP_MARGIN` (the left/right twin of a paired
   organ excepted: CLIP cannot tell sides apart, so without a side word both are returned).
5. Otherwise the item is **rejected** with "did you mean" suggestions. With ``allow_experimental=True`` an item that
   would be rejected is instead returned with method ``"experimental"`` and its raw CLIP embedding, for feeding
   straight into the model's controller; such results are not catalog classes and must be labelled experimental.

Nothing below a threshold is ever mapped to a class silently: every item reports its method and score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from UniversalSegLib.catalog import ClassCatalog, normalize_name
from UniversalSegLib.errors import InputError

if TYPE_CHECKING:  # imported lazily: torch and open_clip are only needed for the CLIP step
    import torch

    from UniversalSegLib.text_encoder import ClipTextEncoder

__all__ = [
    "CLIP_THRESHOLD",
    "CLIP_MARGIN",
    "FUZZY_CUTOFF",
    "FUZZY_MARGIN",
    "FUZZY_MIN_LENGTH",
    "METHODS",
    "ResolvedItem",
    "PromptResolution",
    "resolve_prompt",
    "split_prompt",
    "class_embeddings_from_encoder",
]

#: Minimum cosine similarity (raw CLIP features, L2-normalised before the dot product) between a prompt and a class
#: embedding for the CLIP step to accept the class. The 32 upstream class prompts are themselves 0.76-0.99 similar
#: to one another (e.g. Stomach-Colon 0.954, Liver-Liver Tumor 0.975) because they share the template, so only a
#: high value separates "names this class" from "is some CT structure".
CLIP_THRESHOLD = 0.95
#: The accepted class must beat the best other class (its left/right twin excepted) by this much cosine similarity.
CLIP_MARGIN = 0.01
#: Minimum rapidfuzz ``token_sort_ratio`` (0-100) of a typo against a catalog name, synonym or group word.
#: 85 admits one wrong letter in a 7-letter word ("pancraes", "duodenom", "livr") but not two ("river"/"liver": 80).
FUZZY_CUTOFF = 85.0
#: The best fuzzy candidate must beat the best candidate that names a different set of classes by this many points.
FUZZY_MARGIN = 5.0
#: Texts shorter than this (after normalisation) are never fuzzy-matched: abbreviations must be exact.
FUZZY_MIN_LENGTH = 4

METHODS = ("exact", "synonym", "group", "fuzzy", "clip", "experimental", "rejected")

_LEFT = {"left", "l", "lt", "lft", "sinistra", "sinister"}
_RIGHT = {"right", "r", "rt", "rgt", "dextra", "dexter"}
_BOTH = {"both", "bilateral", "bilaterally", "bilat", "bl", "b l", "paired"}
# Words that carry no anatomy: dropped before matching ("please segment the liver" -> "liver").
_FILLER = {
    "the",
    "a",
    "an",
    "please",
    "segment",
    "segmentation",
    "segmentations",
    "show",
    "find",
    "outline",
    "contour",
    "contours",
    "delineate",
    "label",
    "labels",
    "mask",
    "masks",
    "entire",
    "whole",
    "me",
    "my",
    "of the",
    "also",
}
#: Between list items: , ; and new lines. Within an item: & + and "and" (which may join side words to a structure).
_LIST_SPLIT = re.compile(r"[,;\n\r]+")
_CONNECTOR_SPLIT = re.compile(r"\s*[&+]\s*|\s+(?:and|und|et)\s+", flags=re.IGNORECASE)


def _group_words(cat: ClassCatalog) -> dict[str, tuple[int, ...]]:
    """Group word -> class indices (computed from the catalog's kinds and laterality pairs)."""
    by_kind: dict[str, list[int]] = {}
    for c in cat:
        by_kind.setdefault(c.kind, []).append(c.index)

    def pair(*names: str) -> tuple[int, ...]:
        return tuple(sorted(cat.lookup(n).index for n in names))

    everything = tuple(c.index for c in cat)
    # "organs" follows the paper's "25 organs": solid/hollow organs and vessels, i.e. everything but lesions.
    organs = tuple(sorted(by_kind.get("organ", []) + by_kind.get("vessel", [])))
    tumors = tuple(by_kind.get("tumor", []))
    lesions = tuple(sorted(by_kind.get("tumor", []) + by_kind.get("cyst", [])))
    vessels = tuple(by_kind.get("vessel", []))
    kidneys = pair("Right Kidney", "Left Kidney")
    lungs = pair("Right Lung", "Left Lung")
    adrenals = pair("Right Adrenal Gland", "Left Adrenal Gland")
    femoral_heads = pair("Right Head of Femur", "Left Head of Femur")
    groups: dict[str, tuple[int, ...]] = {}
    for words, classes in [
        (["all", "everything", "all classes", "all structures", "all labels", "all 32 classes"], everything),
        (
            [
                "all organs",
                "organs",
                "all organ",
                "all anatomy",
                "anatomy",
                "all normal anatomy",
                "normal anatomy",
                "all organs and vessels",
                "organs and vessels",
            ],
            organs,
        ),
        (
            [
                "all tumors",
                "all tumours",
                "tumors",
                "tumours",
                "tumor",
                "tumour",
                "all neoplasms",
                "neoplasms",
                "all cancers",
                "cancers",
            ],
            tumors,
        ),
        (
            [
                "all lesions",
                "lesions",
                "lesion",
                "all tumors and cysts",
                "all tumours and cysts",
                "tumors and cysts",
                "tumours and cysts",
            ],
            lesions,
        ),
        (
            [
                "all vessels",
                "vessels",
                "all vascular structures",
                "vascular structures",
                "vasculature",
                "all vasculature",
                "blood vessels",
                "all blood vessels",
                "major vessels",
                "great vessels",
            ],
            vessels,
        ),
        (["kidney", "kidneys", "renal", "all kidneys"], kidneys),
        (["lung", "lungs", "pulmonary"], lungs),
        (
            [
                "adrenal",
                "adrenals",
                "adrenal gland",
                "adrenal glands",
                "suprarenal gland",
                "suprarenal glands",
                "suprarenals",
            ],
            adrenals,
        ),
        (
            [
                "femoral head",
                "femoral heads",
                "head of femur",
                "heads of femur",
                "femur head",
                "femur heads",
                "heads of femurs",
                "heads of the femurs",
                "femoral heads both",
            ],
            femoral_heads,
        ),
        (
            ["kidney lesion", "kidney lesions", "renal lesion", "renal lesions", "renal masses and cysts"],
            pair("Kidney Tumor", "Kidney Cyst"),
        ),
        (["bowel", "bowels", "small and large bowel", "small and large intestine"], pair("Colon", "Intestine")),
    ]:
        for w in words:
            groups[_canon(w)] = classes
    return groups


def _canon(text: str) -> str:
    """Normalise for matching: lower-case, no punctuation, side words unified, filler words dropped."""
    text = re.sub(r"\bb\s*/\s*l\b", " bilateral ", text, flags=re.IGNORECASE)
    words = normalize_name(text).split()
    out = []
    for w in words:
        if w in _LEFT:
            out.append("left")
        elif w in _RIGHT:
            out.append("right")
        elif w in _BOTH:
            out.append("both")
        elif w not in _FILLER:
            out.append(w)
    return " ".join(out)


def _singular(word: str) -> str:
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "as")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ses") and not word.endswith("ases"):  # "abscesses" style; metastases are listed as synonyms
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


@dataclass
class _Target:
    classes: tuple[int, ...]
    method: str  # "exact" | "synonym" | "group"


class _Vocabulary:
    """Canonical phrase -> classes, for one catalog (built once per catalog and cached)."""

    def __init__(self, cat: ClassCatalog):
        self.catalog = cat
        self.targets: dict[str, _Target] = {}
        self.exact_names: dict[str, int] = {}
        for c in cat:
            for n in (c.name, c.prompt_name, c.file_stem):
                self.exact_names[normalize_name(n)] = c.index
        for c in cat:
            for n in (c.name, c.prompt_name, c.file_stem, *c.synonyms):
                self.targets.setdefault(_canon(n), _Target((c.index,), "synonym"))
        for word, classes in _group_words(cat).items():
            self.targets.setdefault(word, _Target(classes, "group"))
        # fuzzy candidates: long enough that a typo is distinguishable from an abbreviation
        self.fuzzy_keys = [k for k in self.targets if len(k) >= FUZZY_MIN_LENGTH]
        # left/right twins (same organ code, opposite side)
        self.twin: dict[int, int] = {}
        for a in cat:
            for b in cat:
                if a.laterality and b.laterality and a.laterality != b.laterality and a.type == b.type:
                    self.twin[a.index] = b.index


_VOCAB_CACHE: dict[int, _Vocabulary] = {}


def _vocabulary(cat: ClassCatalog) -> _Vocabulary:
    v = _VOCAB_CACHE.get(id(cat))
    if v is None or v.catalog is not cat:
        v = _VOCAB_CACHE[id(cat)] = _Vocabulary(cat)
    return v


# ---------------------------------------------------------------------------------------------------------- results
@dataclass
class ResolvedItem:
    """How one prompt item was understood. ``classes`` holds 1-based catalog indices (empty when not accepted)."""

    text: str
    classes: list[int]
    method: str
    score: float | None = None
    suggestions: list[str] = field(default_factory=list)
    embedding: list[float] | None = None

    @property
    def accepted(self) -> bool:
        """True when the item names catalog classes (experimental and rejected items do not)."""
        return bool(self.classes) and self.method not in ("rejected", "experimental")


@dataclass
class PromptResolution:
    """All items of a prompt, in the order typed, and the union of their classes."""

    items: list[ResolvedItem]
    catalog: ClassCatalog = field(default_factory=ClassCatalog.default, repr=False, compare=False)

    @property
    def classes(self) -> list[int]:
        """Sorted union of the classes of accepted items."""
        return sorted({i for item in self.items if item.accepted for i in item.classes})

    @property
    def rejected(self) -> list[ResolvedItem]:
        return [i for i in self.items if i.method == "rejected"]

    @property
    def experimental(self) -> list[ResolvedItem]:
        """Items resolved only to a raw CLIP embedding (``allow_experimental=True``)."""
        return [i for i in self.items if i.method == "experimental"]

    def class_names(self) -> list[str]:
        return [self.catalog[i].name for i in self.classes]

    def to_json(self) -> dict:
        """``{"items": [{"text", "classes": [display names], "method", "score", "suggestions"}]}``."""
        return {
            "items": [
                {
                    "text": it.text,
                    "classes": [self.catalog[i].name for i in it.classes],
                    "method": it.method,
                    "score": None if it.score is None else round(float(it.score), 4),
                    "suggestions": list(it.suggestions),
                }
                for it in self.items
            ]
        }

    def describe(self) -> str:
        """One line per item, e.g. ``'IVC' -> Postcava (synonym)``."""
        lines = []
        for it in self.items:
            score = "" if it.score is None else f", score {it.score:.2f}"
            if it.accepted:
                names = ", ".join(self.catalog[i].name for i in it.classes)
                lines.append(f"'{it.text}' -> {names} ({it.method}{score})")
            elif it.method == "experimental":
                lines.append(
                    f"'{it.text}' -> EXPERIMENTAL raw CLIP embedding, not a catalog class (nearest "
                    f"{', '.join(it.suggestions) or 'none'}{score})"
                )
            else:
                best = "" if it.score is None else f" (best match score {it.score:.2f})"
                hint = f"; did you mean {', '.join(repr(s) for s in it.suggestions)}?" if it.suggestions else ""
                lines.append(f"'{it.text}' -> not recognised{best}{hint}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- resolution
def _is_side(part: str) -> bool:
    """True for a part that is only side words: "right", "left and right", "bilat"."""
    words = _canon(part).split()
    return bool(words) and set(words) <= {"left", "right", "both"}


def _join_sides(parts: list[str]) -> list[str]:
    """Side words split off by "and" go with the next part ("right and left kidney" -> "right left kidney": both),
    or, at the end, with the one before ("left kidney and right")."""
    out: list[str] = []
    pending = ""
    for part in parts:
        if _is_side(part):
            pending = f"{pending} {part}".strip()
            continue
        out.append(f"{pending} {part}".strip() if pending else part)
        pending = ""
    if pending:
        if out and not _is_side(out[-1]):
            out[-1] = f"{out[-1]} {pending}"
        else:
            out.append(pending)
    return out


def split_prompt(text: str | Sequence[str], catalog: ClassCatalog | None = None) -> list[str]:
    """Prompt -> items, split at , ; new line & + and "and" (kept together when the whole phrase is a name).

    Laterality: side words joined by "and" go with the structure ("right and left kidney", "left & right adrenal
    glands": both sides); a side after a comma belongs to the item before it ("Kidney, right"; "kidney, left and
    right")."""
    vocab = _vocabulary(catalog or ClassCatalog.default())
    chunks = [text] if isinstance(text, str) else list(text)
    items: list[str] = []
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise InputError(f"prompt items must be text, got {type(chunk).__name__}")
        pending_side = ""
        first_of_chunk = len(items)
        for part in _LIST_SPLIT.split(chunk):
            part = part.strip()
            if not part:
                continue
            sides = [p for p in _CONNECTOR_SPLIT.split(part) if p.strip()]
            if sides and all(_is_side(p) for p in sides):
                part = " ".join(sides)
                # "Kidney, right" (report style): the side belongs to the neighbouring item
                if len(items) > first_of_chunk and not pending_side:
                    items[-1] = f"{items[-1]} {part}"
                else:
                    pending_side = f"{pending_side} {part}".strip()
                continue
            if pending_side:
                part, pending_side = f"{pending_side} {part}", ""
            if _canon(part) in vocab.targets or not _CONNECTOR_SPLIT.search(part):
                items.append(part)
            else:
                items.extend(_join_sides([p.strip() for p in _CONNECTOR_SPLIT.split(part) if p.strip()]))
        if pending_side:  # a side word with nothing to attach to stays an item (and is rejected)
            items.append(pending_side)
    return items


def class_embeddings_from_encoder(encoder: "ClipTextEncoder", catalog: ClassCatalog | None = None) -> torch.Tensor:
    """The (N_classes, 512) class embeddings computed the upstream way (prompt names, template) with ``encoder``."""
    cat = catalog or ClassCatalog.default()
    return encoder.encode([c.prompt_name for c in cat])


def resolve_prompt(
    text: str | Sequence[str],
    *,
    catalog: ClassCatalog | None = None,
    encoder: "ClipTextEncoder | None" = None,
    class_embeddings: torch.Tensor | None = None,
    clip_threshold: float = CLIP_THRESHOLD,
    allow_experimental: bool = False,
) -> PromptResolution:
    """Resolve a free-text prompt (or several) to catalog classes; never raises for unknown text.

    Args:
        text: e.g. ``"IVC and both kidneys"`` or ``["liver", "lt kidney"]``.
        catalog: defaults to the packaged 32-class catalog.
        encoder: CLIP text encoder for step 4; None skips CLIP (items that would need it are rejected).
        class_embeddings: (N_classes, 512) class embeddings in catalog order, e.g. the checkpoint's
            ``organ_embedding``; None computes them with ``encoder`` from the upstream prompt names.
        clip_threshold: minimum cosine similarity for the CLIP step.
        allow_experimental: return unrecognised items as ``"experimental"`` raw CLIP embeddings instead of rejecting.
    """
    cat = catalog or ClassCatalog.default()
    vocab = _vocabulary(cat)
    clip = _ClipStep(cat, vocab, encoder, class_embeddings, clip_threshold) if encoder is not None else None
    items = [_resolve_item(t, vocab, clip, allow_experimental) for t in split_prompt(text, cat)]
    return PromptResolution(items=items, catalog=cat)


class _ClipStep:
    def __init__(
        self,
        cat: ClassCatalog,
        vocab: _Vocabulary,
        encoder: "ClipTextEncoder",
        class_embeddings: torch.Tensor | None,
        threshold: float,
    ):
        import torch

        self.cat, self.vocab, self.encoder, self.threshold = cat, vocab, encoder, float(threshold)
        emb = class_embeddings if class_embeddings is not None else class_embeddings_from_encoder(encoder, cat)
        emb = torch.as_tensor(emb).detach().float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(cat):
            raise InputError(
                f"class embeddings must have shape ({len(cat)}, D) in catalog order, got {tuple(emb.shape)}"
            )
        self.class_unit = torch.nn.functional.normalize(emb, dim=1)

    def similarities(self, text: str) -> torch.Tensor:
        import torch

        """Cosine similarity of the text's CLIP feature to each class embedding: (N_classes,)."""
        raw = self.encoder.encode([text])[0]
        if raw.shape[0] != self.class_unit.shape[1]:
            raise InputError(
                f"the text encoder gives {raw.shape[0]}-d features but the class embeddings are "
                f"{self.class_unit.shape[1]}-d; use the CLIP model the checkpoint was trained with"
            )
        return self.class_unit @ torch.nn.functional.normalize(raw, dim=0)

    def top_names(self, sims: torch.Tensor, k: int = 3) -> list[str]:
        import torch

        return [self.cat[int(i) + 1].name for i in torch.argsort(sims, descending=True)[:k]]


def _exact_or_variant(phrase: str, vocab: _Vocabulary) -> _Target | None:
    t = vocab.targets.get(phrase)
    if t is not None:
        return t
    singular = " ".join(_singular(w) for w in phrase.split())
    if singular != phrase:
        t = vocab.targets.get(singular)
        if t is not None:
            return _Target(t.classes, t.method)
    return None


def _fuzzy(phrase: str, vocab: _Vocabulary) -> tuple[_Target | None, float, list[str]]:
    """Best fuzzy target (None if below cut-off or margin), its score (0-1) and the suggested class names."""
    from rapidfuzz import fuzz, process

    if len(phrase) < FUZZY_MIN_LENGTH or not vocab.fuzzy_keys:
        return None, 0.0, []
    hits = process.extract(phrase, vocab.fuzzy_keys, scorer=fuzz.token_sort_ratio, limit=25)
    if not hits:
        return None, 0.0, []
    best_key, best_score, _ = hits[0]
    best = vocab.targets[best_key]
    runner_up = max((s for k, s, _ in hits[1:] if vocab.targets[k].classes != best.classes), default=0.0)
    suggestions: list[str] = []
    for k, s, _ in hits:
        if s < 60:
            break
        if len(vocab.targets[k].classes) > 2:  # "all structures" & co. suggest nothing specific
            continue
        for i in vocab.targets[k].classes:
            name = vocab.catalog[i].name
            if name not in suggestions:
                suggestions.append(name)
    if best_score >= FUZZY_CUTOFF and best_score - runner_up >= FUZZY_MARGIN:
        return best, best_score / 100.0, suggestions[:3]
    return None, best_score / 100.0, suggestions[:3]


def _apply_side(classes: tuple[int, ...], side: str | None, vocab: _Vocabulary) -> tuple[int, ...] | None:
    """Restrict/expand classes by a side word; None when the side contradicts every class."""
    if side is None:
        return classes
    cat = vocab.catalog
    if side == "both":
        out = set(classes) | {vocab.twin[i] for i in classes if i in vocab.twin}
        return tuple(sorted(out))
    lateral = [i for i in classes if cat[i].laterality]
    if not lateral:
        return classes  # "left colon", "right kidney tumour": the class covers both sides
    keep = tuple(i for i in classes if cat[i].laterality == side or not cat[i].laterality)
    return keep or None


def _resolve_item(text: str, vocab: _Vocabulary, clip: _ClipStep | None, allow_experimental: bool) -> ResolvedItem:
    phrase = _canon(text)
    if not phrase:
        return ResolvedItem(text, [], "rejected", None, [])

    # 1) the whole phrase (side words included: "lt kidney", "both kidneys" is handled below)
    t = _exact_or_variant(phrase, vocab)
    if t is not None:
        method = t.method
        if method == "synonym" and normalize_name(text) in vocab.exact_names:
            method = "exact"
        return ResolvedItem(text, list(t.classes), method)

    # 2) side word + base phrase
    words = phrase.split()
    sides = {w for w in words if w in ("left", "right", "both")}
    side = None if not sides else ("both" if len(sides) > 1 or "both" in sides else sides.pop())
    base = " ".join(w for w in words if w not in ("left", "right", "both"))
    suggestions: list[str] = []
    best_score: float | None = None
    if base:
        if side is not None:
            t = _exact_or_variant(base, vocab)
            if t is not None:
                sided = _apply_side(t.classes, side, vocab)
                if sided:
                    return ResolvedItem(text, list(sided), t.method)
        # 3) fuzzy (whole phrase first, then the base with the side applied)
        for candidate, apply in ((phrase, None), (base, side)) if side is not None else ((phrase, None),):
            ft, fscore, fsugg = _fuzzy(candidate, vocab)
            suggestions += [s for s in fsugg if s not in suggestions]
            best_score = max(best_score or 0.0, fscore)
            if ft is not None:
                sided = _apply_side(ft.classes, apply, vocab)
                if sided:
                    return ResolvedItem(text, list(sided), "fuzzy", fscore)

    # 4) CLIP
    if clip is not None and base:
        sims = clip.similarities(base)
        order = sims.argsort(descending=True).tolist()
        top = order[0] + 1
        top_score = float(sims[order[0]])
        twin = vocab.twin.get(top)
        rival = next((float(sims[j]) for j in order[1:] if j + 1 != twin), -1.0)
        clip_names = clip.top_names(sims)
        if top_score >= clip.threshold and top_score - rival >= CLIP_MARGIN:
            classes: tuple[int, ...] = (top,)
            if twin is not None and side is None and top_score - float(sims[twin - 1]) < CLIP_MARGIN:
                classes = tuple(sorted((top, twin)))  # CLIP cannot tell left from right
            sided = _apply_side(classes, side, vocab)
            if side in ("left", "right") and twin is not None:
                sided = _apply_side((top, twin), side, vocab)
            if sided:
                return ResolvedItem(text, list(sided), "clip", top_score)
        # "did you mean": the two CLIP-nearest classes, then the closest spelling (if it differs)
        merged = list(dict.fromkeys(clip_names[:2] + suggestions[:1] + clip_names[2:]))
        if allow_experimental:
            emb = clip.encoder.encode([text])[0]
            return ResolvedItem(text, [], "experimental", top_score, merged[:3], embedding=[float(v) for v in emb])
        return ResolvedItem(text, [], "rejected", top_score, merged[:3])

    # suggestions only name classes that look similar (fuzzy score >= 60); pure nonsense gets none
    return ResolvedItem(text, [], "rejected", best_score if best_score else None, suggestions[:3])
