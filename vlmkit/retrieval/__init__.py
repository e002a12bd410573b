"""Cross-modal retrieval with a dual encoder (docs/retrieval.md): the library side of `vlmkit index`,
`vlmkit search` and `vlmkit eval --task retrieval|zeroshot`.

    from vlmkit.retrieval import build_index, search, evaluate_retrieval
    build_index("runs/r/model", "idx", images="photos/")
    search("idx", text="a red circle on the left", k=5)   # [{"rank": 1, "path": ..., "score": ...}, ...]
"""

from vlmkit.retrieval.evaluate import evaluate_retrieval, evaluate_zeroshot
from vlmkit.retrieval.index import Index, build_index, search

__all__ = ["Index", "build_index", "search", "evaluate_retrieval", "evaluate_zeroshot"]
