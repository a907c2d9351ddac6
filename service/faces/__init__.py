"""The API faces, one module each, on the shared modules jobs (submission, waiting), uploads and errors:
native (this project's API), openai (the OpenAI Images API), a1111 (a subset of the AUTOMATIC1111 web UI
API). No face imports another; service/api.py (the app) includes them all."""
