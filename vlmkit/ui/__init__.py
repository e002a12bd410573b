"""The web UI (`vlmkit ui`): chat with a model in the browser, see what it receives, compare two models.

The handlers are plain functions and classes (`chat.py`, `compare.py`, `seen.py`, `backends.py`) that
tests drive without a browser; `files.py` hands Gradio pictures as files written once; `app.py` only
wires them to Gradio components. Gradio is imported in `app.py` alone, so the rest of vlmkit never
needs it (`pip install 'vlmkit[ui]'`).
"""
