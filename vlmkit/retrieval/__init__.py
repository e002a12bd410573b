"""Cross-modal retrieval with a dual encoder: embed, index, search, evaluate (docs/retrieval.md)."""
