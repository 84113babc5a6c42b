"""Grouping perturbations into behaviours: which vectors make the model do the same thing?

Each steered perturbation is represented by the sentence embeddings of its completions (one unit vector per
prompt, samples averaged, concatenated over prompts and scaled so that the cosine between two perturbations is
their mean cosine over prompts). Perturbations whose completions stay close to the unsteered one
(cosine distance < `no_change_below`) form their own "no change" group; the others are grouped by
agglomerative clustering (average linkage, cosine distance, a distance threshold rather than a fixed number of
clusters). Each cluster is named by its most distinctive words: TF-IDF with one document per cluster (its
texts joined), plus the unsteered texts as a background document, so that words every completion shares, or
the unsteered answer already uses, score low.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Optional, Sequence

import numpy as np

from melbo.engine.generation import Completion

NO_CHANGE = "no change"


def cluster_behaviours(
    completions: Sequence[Completion],
    embeddings: np.ndarray,
    distance_from_unsteered: Mapping[str, float] | Sequence[float],
    no_change_below: float = 0.1,
    threshold: float = 0.3,
    n_words: int = 3,
) -> dict:
    """Cluster the steered perturbations of `completions` by what they make the model say.

    `embeddings` has one unit row per completion (as `evaluation.embed` gives). `distance_from_unsteered` is
    either a mapping label → distance (as in `evaluation.score(...)["perturbations"]`) or one value per
    completion (averaged per label). `threshold` is the cosine-distance cut of the dendrogram (average linkage):
    with all-MiniLM-L6-v2, two framings of one answer are ~0.2–0.3 apart, unrelated texts 0.6–1.

    Returns {"perturbations": [{"label", "vector", "cluster", "cluster_name", "no_change"}, ...] (steered ones,
    in order of first appearance), "clusters": [{"id", "name", "members": [labels], "no_change"}, ...]}.
    Behaviour clusters are numbered by first appearance; the "no change" group, if any, comes last.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(embeddings) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(embeddings)} embeddings")
    labels, vectors, rows_of = _steered_labels(completions)
    distances = _distances(completions, distance_from_unsteered, labels)
    no_change = [d is not None and not math.isnan(d) and d < no_change_below for d in distances]

    changed = [i for i, flag in enumerate(no_change) if not flag]
    assignment: list[Optional[int]] = [None] * len(labels)
    if len(changed) == 1:
        assignment[changed[0]] = 0
    elif len(changed) > 1:
        features = _features(completions, embeddings, [rows_of[labels[i]] for i in changed])
        raw = _agglomerate(features, threshold)
        renumber: dict[int, int] = {}
        for i, c in zip(changed, raw):
            assignment[i] = renumber.setdefault(int(c), len(renumber))
    n_behaviours = max((a for a in assignment if a is not None), default=-1) + 1
    no_change_id = n_behaviours if any(no_change) else None
    for i, flag in enumerate(no_change):
        if flag:
            assignment[i] = no_change_id

    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(assignment):
        members[c].append(i)
    background = " ".join(c.text for c in completions if c.vector is None)
    documents = [" ".join(completions[r].text for i in members[c] for r in rows_of[labels[i]])
                 for c in range(n_behaviours)]
    names = distinctive_words(documents, background, n_words)
    clusters = [{"id": c, "name": names[c], "members": [labels[i] for i in members[c]], "no_change": False}
                for c in range(n_behaviours)]
    if no_change_id is not None:
        clusters.append({"id": no_change_id, "name": NO_CHANGE, "members": [labels[i] for i in members[no_change_id]],
                         "no_change": True})
    name_of = {c["id"]: c["name"] for c in clusters}
    perturbations = [
        {"label": label, "vector": vectors[i], "cluster": assignment[i], "cluster_name": name_of[assignment[i]],
         "no_change": no_change[i]}
        for i, label in enumerate(labels)
    ]
    return {"perturbations": perturbations, "clusters": clusters}


def _steered_labels(completions: Sequence[Completion]):
    labels: list[str] = []
    vectors: list[Optional[int]] = []
    rows_of: dict[str, list[int]] = defaultdict(list)
    for r, c in enumerate(completions):
        if c.vector is None:
            continue
        if c.label not in rows_of:
            labels.append(c.label)
            vectors.append(c.vector)
        rows_of[c.label].append(r)
    return labels, vectors, rows_of


def _distances(completions, given, labels: list[str]) -> list[Optional[float]]:
    if isinstance(given, Mapping):
        return [given.get(label) for label in labels]
    if len(given) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(given)} distances from unsteered")
    per_label: dict[str, list[float]] = defaultdict(list)
    for c, d in zip(completions, given):
        if d is not None and not math.isnan(d):
            per_label[c.label].append(float(d))
    return [float(np.mean(per_label[label])) if per_label[label] else None for label in labels]


def _features(completions, embeddings: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """One row per perturbation: per-prompt unit mean embeddings, concatenated and scaled to unit norm."""
    prompts = sorted({completions[r].prompt_index for rows in groups for r in rows})
    width = embeddings.shape[1]
    features = np.zeros((len(groups), len(prompts) * width))
    for g, rows in enumerate(groups):
        for k, p in enumerate(prompts):
            chosen = [r for r in rows if completions[r].prompt_index == p]
            if not chosen:
                continue
            mean = embeddings[chosen].mean(0)
            norm = np.linalg.norm(mean)
            if norm > 0:
                features[g, k * width : (k + 1) * width] = mean / norm
        norm = np.linalg.norm(features[g])
        if norm > 0:
            features[g] /= norm
    return features


def _agglomerate(features: np.ndarray, threshold: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    model = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="cosine",
                                    linkage="average")
    return model.fit_predict(features)


def distinctive_words(documents: list[str], background: str, n_words: int) -> list[str]:
    """The `n_words` highest TF-IDF words of each document against the others (and the unsteered text)."""
    if not documents:
        return []
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = documents + ([background] if background.strip() else [])
    try:
        vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b", sublinear_tf=True)
        matrix = vectorizer.fit_transform(corpus).toarray()
    except ValueError:  # nothing but stop words, numbers or punctuation
        return [f"cluster {c}" for c in range(len(documents))]
    vocabulary = np.asarray(vectorizer.get_feature_names_out())
    names = []
    for c in range(len(documents)):
        row = matrix[c]
        order = [j for j in np.argsort(-row, kind="stable") if row[j] > 0][:n_words]
        names.append(" ".join(vocabulary[order]) if order else f"cluster {c}")
    return names
