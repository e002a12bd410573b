"""Dataset distillation: a teacher VLM labels a folder of images (`run.py`, through `teachers.py`), the
automatic filters check every reply (`filters.py`), the manifest records it (`manifest.py`), a person
reviews the result in the browser (`review.py`, `review_app.py`) and `vlmkit train` learns from it.
Guide: docs/distill.md."""
