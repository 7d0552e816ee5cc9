"""The top-k confusion view against a loop over each query's ranking."""
import numpy as np

from evaluation.fairness import most_confused, top_k_confusion


def test_top_k_confusion_equals_a_loop_and_names_the_most_confused_pairs():
    rng = np.random.default_rng(0)
    q_labels, db_labels = rng.integers(0, 3, 30), rng.integers(0, 4, 50)  # class 3 has no queries
    distances = rng.integers(0, 6, (30, 50))  # many ties: broken by database id
    exclude = rng.random((30, 50)) < 0.1
    got = top_k_confusion(distances, q_labels, db_labels, n_classes=4, k=10, exclude=exclude)
    want = np.zeros((4, 4))
    for row, label, skip in zip(distances, q_labels, exclude):
        order = sorted((i for i in range(50) if not skip[i]), key=lambda i: (row[i], i))[:10]
        for i in order:
            want[label, db_labels[i]] += 1 / 10 / (q_labels == label).sum()
    assert np.allclose(got, want)
    assert np.allclose(got[:3].sum(axis=1), 1) and not got[3].any()
    # Similarities rank the other way round.
    assert np.allclose(top_k_confusion(-distances, q_labels, db_labels, 4, 10, descending=True, exclude=exclude), got)

    names = ["a", "b", "c", "d"]
    pairs = most_confused(got, names, n=3)
    off = sorted(((got[i, j], i, j) for i in range(4) for j in range(4) if i != j), key=lambda t: (-t[0], t[1], t[2]))
    assert [(p["query_class"], p["result_class"]) for p in pairs] == [(names[i], names[j]) for _, i, j in off[:3]]
    assert pairs[0]["share"] == off[0][0]
